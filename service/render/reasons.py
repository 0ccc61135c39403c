"""The fixed vocabulary of recapture reasons, and what to tell the health worker, in their language.

Codes are a public contract (apps switch on them, dashboards count them): add, never rename. The advice
for the highest-priority reason is the one sentence shown; `Reason` order below is that priority: fix the
framing before the light, the light before the focus, and the focus before the exam stage.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    NO_CERVIX = "no_cervix"
    CERVIX_CUT_OFF = "cervix_cut_off"
    CERVIX_TOO_SMALL = "cervix_too_small"
    TOO_DARK = "too_dark"
    OVEREXPOSED = "overexposed"
    GLARE = "glare"
    MOTION_BLUR = "motion_blur"
    OUT_OF_FOCUS = "out_of_focus"
    NOT_ACETIC = "not_acetic"


PRIORITY = tuple(Reason)
LANGUAGES = ("en", "es", "fr", "pt", "sw")
DEFAULT_LANGUAGE = "en"

# What is wrong, per reason and language.
MESSAGES: dict[str, dict[Reason, str]] = {
    "en": {
        Reason.NO_CERVIX: "No cervix was found in the photo.",
        Reason.CERVIX_CUT_OFF: "Part of the cervix is outside the photo.",
        Reason.CERVIX_TOO_SMALL: "The cervix is too small in the photo.",
        Reason.TOO_DARK: "The photo is too dark.",
        Reason.OVEREXPOSED: "The photo is too bright.",
        Reason.GLARE: "Glare covers part of the cervix.",
        Reason.MOTION_BLUR: "The photo is blurred by movement.",
        Reason.OUT_OF_FOCUS: "The cervix is out of focus.",
        Reason.NOT_ACETIC: "The photo does not look taken after acetic acid.",
    },
    "es": {
        Reason.NO_CERVIX: "No se encontró el cuello uterino en la foto.",
        Reason.CERVIX_CUT_OFF: "Parte del cuello uterino queda fuera de la foto.",
        Reason.CERVIX_TOO_SMALL: "El cuello uterino se ve demasiado pequeño en la foto.",
        Reason.TOO_DARK: "La foto está demasiado oscura.",
        Reason.OVEREXPOSED: "La foto está demasiado clara.",
        Reason.GLARE: "Un reflejo tapa parte del cuello uterino.",
        Reason.MOTION_BLUR: "La foto está movida.",
        Reason.OUT_OF_FOCUS: "El cuello uterino está desenfocado.",
        Reason.NOT_ACETIC: "La foto no parece tomada después del ácido acético.",
    },
    "fr": {
        Reason.NO_CERVIX: "Aucun col de l'utérus n'a été trouvé sur la photo.",
        Reason.CERVIX_CUT_OFF: "Une partie du col est hors de la photo.",
        Reason.CERVIX_TOO_SMALL: "Le col est trop petit sur la photo.",
        Reason.TOO_DARK: "La photo est trop sombre.",
        Reason.OVEREXPOSED: "La photo est trop claire.",
        Reason.GLARE: "Un reflet couvre une partie du col.",
        Reason.MOTION_BLUR: "La photo est floue à cause d'un mouvement.",
        Reason.OUT_OF_FOCUS: "Le col n'est pas net.",
        Reason.NOT_ACETIC: "La photo ne semble pas prise après l'acide acétique.",
    },
    "pt": {
        Reason.NO_CERVIX: "Não foi encontrado o colo do útero na foto.",
        Reason.CERVIX_CUT_OFF: "Parte do colo do útero está fora da foto.",
        Reason.CERVIX_TOO_SMALL: "O colo do útero está muito pequeno na foto.",
        Reason.TOO_DARK: "A foto está escura demais.",
        Reason.OVEREXPOSED: "A foto está clara demais.",
        Reason.GLARE: "Um reflexo cobre parte do colo do útero.",
        Reason.MOTION_BLUR: "A foto está tremida.",
        Reason.OUT_OF_FOCUS: "O colo do útero está fora de foco.",
        Reason.NOT_ACETIC: "A foto não parece ter sido tirada após o ácido acético.",
    },
    "sw": {
        Reason.NO_CERVIX: "Shingo la kizazi halikuonekana kwenye picha.",
        Reason.CERVIX_CUT_OFF: "Sehemu ya shingo la kizazi iko nje ya picha.",
        Reason.CERVIX_TOO_SMALL: "Shingo la kizazi ni dogo mno kwenye picha.",
        Reason.TOO_DARK: "Picha ina giza mno.",
        Reason.OVEREXPOSED: "Picha ina mwanga mwingi mno.",
        Reason.GLARE: "Mng'ao unafunika sehemu ya shingo la kizazi.",
        Reason.MOTION_BLUR: "Picha imetikisika.",
        Reason.OUT_OF_FOCUS: "Shingo la kizazi halionekani wazi.",
        Reason.NOT_ACETIC: "Picha haionekani kupigwa baada ya asidi asetiki.",
    },
}

# What to do about it: one sentence the health worker can act on at once.
ADVICE: dict[str, dict[Reason, str]] = {
    "en": {
        Reason.NO_CERVIX: "Open the speculum fully, point the camera at the cervix and take the photo again.",
        Reason.CERVIX_CUT_OFF: "Centre the cervix in the screen so all of it shows, and take the photo again.",
        Reason.CERVIX_TOO_SMALL: "Move closer or zoom in until the cervix fills most of the screen, then take the "
        "photo again.",
        Reason.TOO_DARK: "Turn on the light or move it closer to the speculum, and take the photo again.",
        Reason.OVEREXPOSED: "Dim the light or move it back a little, and take the photo again.",
        Reason.GLARE: "Tilt the phone slightly or dab away the mucus so the light does not reflect, and take the "
        "photo again.",
        Reason.MOTION_BLUR: "Hold the phone still with both hands or rest it on a support, and take the photo "
        "again.",
        Reason.OUT_OF_FOCUS: "Tap the screen on the cervix to focus, hold the phone still, and take the photo "
        "again.",
        Reason.NOT_ACETIC: "Apply 5 % acetic acid, wait one minute, and take the photo again.",
    },
    "es": {
        Reason.NO_CERVIX: "Abra bien el espéculo, apunte la cámara al cuello uterino y tome la foto de nuevo.",
        Reason.CERVIX_CUT_OFF: "Centre el cuello uterino en la pantalla para que se vea entero y tome la foto de "
        "nuevo.",
        Reason.CERVIX_TOO_SMALL: "Acérquese o haga zoom hasta que el cuello uterino llene casi toda la pantalla y "
        "tome la foto de nuevo.",
        Reason.TOO_DARK: "Encienda la luz o acérquela al espéculo y tome la foto de nuevo.",
        Reason.OVEREXPOSED: "Baje la luz o aléjela un poco y tome la foto de nuevo.",
        Reason.GLARE: "Incline un poco el teléfono o retire el moco para que la luz no se refleje y tome la foto "
        "de nuevo.",
        Reason.MOTION_BLUR: "Sostenga el teléfono quieto con las dos manos o apóyelo y tome la foto de nuevo.",
        Reason.OUT_OF_FOCUS: "Toque la pantalla sobre el cuello uterino para enfocar, mantenga el teléfono quieto "
        "y tome la foto de nuevo.",
        Reason.NOT_ACETIC: "Aplique ácido acético al 5 %, espere un minuto y tome la foto de nuevo.",
    },
    "fr": {
        Reason.NO_CERVIX: "Ouvrez bien le spéculum, visez le col avec l'appareil et reprenez la photo.",
        Reason.CERVIX_CUT_OFF: "Centrez le col à l'écran pour qu'il soit entièrement visible et reprenez la photo.",
        Reason.CERVIX_TOO_SMALL: "Rapprochez-vous ou zoomez jusqu'à ce que le col remplisse presque tout l'écran, "
        "puis reprenez la photo.",
        Reason.TOO_DARK: "Allumez la lumière ou rapprochez-la du spéculum et reprenez la photo.",
        Reason.OVEREXPOSED: "Baissez la lumière ou éloignez-la un peu et reprenez la photo.",
        Reason.GLARE: "Inclinez légèrement le téléphone ou essuyez le mucus pour éviter le reflet, et reprenez "
        "la photo.",
        Reason.MOTION_BLUR: "Tenez le téléphone immobile à deux mains ou posez-le sur un appui, et reprenez la "
        "photo.",
        Reason.OUT_OF_FOCUS: "Touchez l'écran sur le col pour faire la mise au point, tenez le téléphone immobile "
        "et reprenez la photo.",
        Reason.NOT_ACETIC: "Appliquez l'acide acétique à 5 %, attendez une minute et reprenez la photo.",
    },
    "pt": {
        Reason.NO_CERVIX: "Abra bem o espéculo, aponte a câmera para o colo do útero e tire a foto de novo.",
        Reason.CERVIX_CUT_OFF: "Centralize o colo do útero na tela para que apareça inteiro e tire a foto de novo.",
        Reason.CERVIX_TOO_SMALL: "Aproxime-se ou use o zoom até o colo do útero ocupar quase toda a tela e tire a "
        "foto de novo.",
        Reason.TOO_DARK: "Ligue a luz ou aproxime-a do espéculo e tire a foto de novo.",
        Reason.OVEREXPOSED: "Diminua a luz ou afaste-a um pouco e tire a foto de novo.",
        Reason.GLARE: "Incline um pouco o telefone ou limpe o muco para a luz não refletir e tire a foto de novo.",
        Reason.MOTION_BLUR: "Segure o telefone parado com as duas mãos ou apoie-o e tire a foto de novo.",
        Reason.OUT_OF_FOCUS: "Toque na tela sobre o colo do útero para focar, segure o telefone parado e tire a "
        "foto de novo.",
        Reason.NOT_ACETIC: "Aplique ácido acético a 5 %, espere um minuto e tire a foto de novo.",
    },
    "sw": {
        Reason.NO_CERVIX: "Fungua spekulamu kikamilifu, elekeza kamera kwenye shingo la kizazi na upige picha "
        "tena.",
        Reason.CERVIX_CUT_OFF: "Weka shingo la kizazi katikati ya skrini ili lionekane lote, na upige picha tena.",
        Reason.CERVIX_TOO_SMALL: "Sogea karibu au kuza hadi shingo la kizazi lijaze sehemu kubwa ya skrini, kisha "
        "upige picha tena.",
        Reason.TOO_DARK: "Washa taa au isogeze karibu na spekulamu, na upige picha tena.",
        Reason.OVEREXPOSED: "Punguza mwanga au sogeza taa nyuma kidogo, na upige picha tena.",
        Reason.GLARE: "Inamisha simu kidogo au futa kamasi ili mwanga usiakisi, na upige picha tena.",
        Reason.MOTION_BLUR: "Shika simu kwa mikono miwili bila kutikisa au iegemeze, na upige picha tena.",
        Reason.OUT_OF_FOCUS: "Gusa skrini kwenye shingo la kizazi ili kulenga, shika simu bila kutikisa, na upige "
        "picha tena.",
        Reason.NOT_ACETIC: "Paka asidi asetiki ya asilimia 5, subiri dakika moja, na upige picha tena.",
    },
}


def ordered(reasons: set[Reason]) -> list[Reason]:
    return [reason for reason in PRIORITY if reason in reasons]


def negotiate_language(accept_language: str | None) -> str:
    """The best supported language for an `Accept-Language` header (RFC 9110 q-values), else English."""
    best, best_q = DEFAULT_LANGUAGE, 0.0
    for item in (accept_language or "").split(","):
        tag, _, params = item.strip().partition(";")
        primary = tag.strip().lower().split("-")[0]
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if primary in LANGUAGES and q > best_q:  # strict: on equal q the entry listed first wins
            best, best_q = primary, q
    return best
