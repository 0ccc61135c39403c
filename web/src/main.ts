// The capture page: the camera loop (one preview frame in flight at a time, as fast as answers come back),
// the overlay, auto-capture and the shutter, the result, the exam's steps, and the settings.

import * as api from "./api";
import { Camera, type Still } from "./camera";
import { DeviceGate, type DeviceAnswer } from "./device/gate";
import { fromImageData } from "./device/preprocess";
import { ExamFlow } from "./exam";
import { AutoCapture, LoopStats } from "./gate";
import { translate, translatePage, type Key } from "./i18n";
import { Outbox, OutboxFull, MIN_PASSPHRASE_LENGTH, type OutboxEntry } from "./outbox";
import { drawBox } from "./overlay";
import * as stored from "./settings";

const $ = <T extends HTMLElement = HTMLElement>(id: string): T => document.getElementById(id) as T;

/** One auto- or manual capture, as the page saw it (performance.now() milliseconds). */
interface CaptureRecord {
  trigger: "auto" | "manual";
  holdStillAt: number | null; // the first passing frame of the run that led to it
  capturedAt: number;
  shownAt: number | null; // the result on screen
  source: Still["source"];
  width: number;
  height: number;
  decision: string | null; // the result shown; "stored" when the photo waits on the device
}

export type GateMode = "server" | "device";

/** What tests and `make bench-capture` read: the loop's figures, every capture, which gate answers, and
 * the device gate itself (to judge a given JPEG as the live loop would, for the parity test). */
export interface PageTelemetry {
  stats: LoopStats;
  captures: CaptureRecord[];
  mode: "single" | "exam";
  gate: GateMode;
  /** Photos stored offline and later assessed: their outbox id and the decision that came back. */
  forwarded: { id: string; decision: string }[];
  deviceGate: {
    ready: boolean;
    error: string | null;
    downloadBytes: number;
    threads: number;
    assessJpeg?: (jpeg: Uint8Array, stage: string) => Promise<DeviceAnswer>;
  };
}

const RETRY_MAX_MS = 5000;
const PROBE_EVERY_MS = 3000; // while the device gate answers, how often to look for the service again
const PREVIEW_TIMEOUT_MS = 5000; // a preview answer later than this is no use: the device gate takes over
const FORWARD_TIMEOUT_MS = 60_000; // one stored photo's (or exam's) assessment once the service is back
// What the device keeps while offline: a day's screening at a busy clinic, a few MB a photo.
const OUTBOX_LIMITS = { maxItems: 40, maxBytes: 200 * 1024 * 1024 };

class CaptureApp {
  private settings = stored.load();
  private readonly stats = new LoopStats();
  private readonly auto = new AutoCapture(this.settings.autoCaptureFrames);
  private camera: Camera | null = null;
  private exam: ExamFlow | null = null;
  private paused = false;
  private resume: (() => void) | null = null;
  private holdStillAt: number | null = null;
  private shutterPressed = false;
  private retryMs = 500;
  private device: DeviceGate | null = null;
  private gate: GateMode = "server";
  private lastProbe = 0;
  private deviceLoading: Promise<void> | null = null;
  private outbox: Outbox | null = null;
  private forwarding = false;
  readonly telemetry: PageTelemetry = {
    stats: this.stats,
    captures: [],
    mode: this.settings.mode,
    gate: "server",
    forwarded: [],
    deviceGate: { ready: false, error: null, downloadBytes: 0, threads: 0 },
  };

  constructor() {
    $("start").addEventListener("click", () => void this.start());
    $("shutter").addEventListener("click", () => {
      if (!this.paused) this.shutterPressed = true; // not while a result or the settings are shown
    });
    $("retake").addEventListener("click", () => this.retake());
    $("next").addEventListener("click", () => this.nextPatient());
    $("open-settings").addEventListener("click", () => this.openSettings());
    $("settings").addEventListener("close", () => this.closeSettings());
    this.applySettings();
    if (!window.isSecureContext || !navigator.mediaDevices?.getUserMedia) {
      $<HTMLButtonElement>("start").disabled = true;
      this.notice("secureContext");
    }
    $("unlock-form").addEventListener("submit", (event) => {
      event.preventDefault();
      void this.submitPassphrase();
    });
    this.showGateMode();
    void this.loadDeviceGate();
    void this.openOutbox();
  }

  // --- store and forward --------------------------------------------------------------------------

  private async openOutbox(): Promise<void> {
    try {
      this.outbox = await Outbox.open(OUTBOX_LIMITS);
    } catch {
      return; // no IndexedDB (a private window on some browsers): photos cannot wait offline
    }
    await this.showOutbox();
    void this.forward();
  }

  private async showOutbox(progress = ""): Promise<void> {
    if (!this.outbox) return;
    const usage = await this.outbox.usage();
    const element = $("outbox");
    element.dataset.count = String(usage.count);
    element.hidden = usage.count === 0 && !progress;
    const full = usage.count >= usage.maxItems || usage.bytes >= usage.maxBytes * 0.9;
    element.dataset.full = String(full);
    element.textContent = progress || this.t(full ? "outboxFull" : "outboxWaiting", { n: usage.count });
  }

  private unlocked: (() => void) | null = null;

  /** Resolves once the worker has unlocked the outbox (the dialog stays until the passphrase is right). */
  private unlockOutbox(): Promise<void> {
    if (!this.outbox || !this.outbox.locked) return Promise.resolve();
    return new Promise<void>((resolve) => {
      this.unlocked = resolve;
      void this.outbox!.hasPassphrase().then((set) => {
        $("unlock-message").textContent = this.t(set ? "unlockEnter" : "unlockChoose", { n: MIN_PASSPHRASE_LENGTH });
        const dialog = $<HTMLDialogElement>("unlock");
        if (!dialog.open) dialog.showModal();
      });
    });
  }

  private async submitPassphrase(): Promise<void> {
    const input = $<HTMLInputElement>("unlock-passphrase");
    let ok = false;
    try {
      ok = (await this.outbox?.unlock(input.value)) ?? false;
    } catch (error) {
      $("unlock-message").textContent = String((error as Error).message);
      return;
    }
    if (!ok) {
      $("unlock-message").textContent = this.t("unlockWrong");
      return;
    }
    input.value = "";
    $<HTMLDialogElement>("unlock").close();
    this.unlocked?.();
    this.unlocked = null;
  }

  /** Keeps a still (or an exam) on the device, encrypted, until the service can assess it. */
  private async store(photos: Blob[], fields?: Record<string, string>): Promise<boolean> {
    if (!this.outbox) return false;
    await this.unlockOutbox();
    try {
      await this.outbox.add({ endpoint: fields ? "/v1/exams" : "/v1/assess", photos, fields });
    } catch (error) {
      this.notice(null, error instanceof OutboxFull ? this.t("outboxFull") : String(error));
      return false;
    }
    await this.showOutbox();
    return true;
  }

  /** Sends what waits on the device, each once (its id is the Idempotency-Key), and shows the answers. */
  private async forward(): Promise<void> {
    if (!this.outbox || this.forwarding || this.gate !== "server") return;
    if ((await this.outbox.usage()).count === 0) return;
    this.forwarding = true;
    try {
      await this.unlockOutbox();
      const answers: { entry: OutboxEntry; answer: unknown }[] = [];
      await this.outbox.sync(
        (entry, body) => this.send(entry, body, answers),
        (done, total) => void this.showOutbox(this.t("outboxSending", { done, total })),
      );
      const last = answers.at(-1);
      if (last) {
        this.pause();
        if (last.entry.endpoint === "/v1/exams") this.showExamResult(last.answer as api.Exam);
        else this.showAssessment(last.answer as api.Assessment);
        $("result-advice").textContent = [this.t("forwarded", { n: answers.length }), $("result-advice").textContent]
          .filter(Boolean)
          .join(" ");
      }
    } finally {
      this.forwarding = false;
      await this.showOutbox();
    }
  }

  private async send(entry: OutboxEntry, body: FormData, answers: { entry: OutboxEntry; answer: unknown }[]) {
    const headers: Record<string, string> = { "Idempotency-Key": entry.id, "Accept-Language": this.settings.language };
    if (this.settings.apiKey) headers["Authorization"] = `Bearer ${this.settings.apiKey}`;
    const response = await fetch(`${entry.endpoint}?include=overlay`, {
      method: "POST",
      body,
      headers,
      cache: "no-store",
      credentials: "omit",
      signal: AbortSignal.timeout(FORWARD_TIMEOUT_MS),
    });
    const answer = await response.json().catch(() => ({}));
    if (response.ok) {
      answers.push({ entry, answer });
      this.telemetry.forwarded.push({ id: entry.id, decision: (answer as { decision?: string }).decision ?? "" });
    }
    return { status: response.status, code: response.ok ? undefined : (answer as { code?: string }).code };
  }

  // --- the device gate --------------------------------------------------------------------------------

  /** Loads the detector and quality models for the offline gate while the service can be reached (or from
   * the service worker's cache when it cannot). */
  private loadDeviceGate(): Promise<void> {
    this.deviceLoading ??= this.openDeviceGate().finally(() => (this.deviceLoading = null));
    return this.deviceLoading;
  }

  private async openDeviceGate(): Promise<void> {
    if (this.device) return;
    try {
      const threads = this.settings.deviceThreads || Math.min(2, navigator.hardwareConcurrency || 1);
      this.device = await DeviceGate.load(this.client(), threads);
      const device = this.device;
      this.telemetry.deviceGate = {
        ready: true,
        error: null,
        downloadBytes: device.downloadBytes,
        threads: device.threads,
        assessJpeg: async (jpeg, stage) => {
          const bitmap = await createImageBitmap(new Blob([jpeg as BlobPart], { type: "image/jpeg" }));
          const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
          const context = canvas.getContext("2d", { willReadFrequently: true })!;
          context.drawImage(bitmap, 0, 0);
          const pixels = context.getImageData(0, 0, bitmap.width, bitmap.height);
          bitmap.close();
          return device.assess(fromImageData(pixels), stage, this.settings.language);
        },
      };
    } catch (error) {
      this.telemetry.deviceGate = { ready: false, error: String(error), downloadBytes: 0, threads: 0 };
    }
  }

  private setGate(gate: GateMode): void {
    this.gate = gate;
    this.telemetry.gate = gate;
    this.showGateMode();
    if (gate === "device") this.hideNotice();
  }

  private showGateMode(): void {
    const pill = $("gate");
    pill.dataset.gate = this.gate;
    pill.textContent = this.t(this.gate === "device" ? "gateDevice" : "gateServer");
  }

  /** While the device gate answers: every few seconds, is the service back? */
  private async probeServer(): Promise<void> {
    if (performance.now() - this.lastProbe < PROBE_EVERY_MS) return;
    this.lastProbe = performance.now();
    try {
      const response = await fetch("/readyz", { cache: "no-store", signal: AbortSignal.timeout(2000) });
      if (response.ok) {
        this.setGate("server");
        void this.forward();
      }
    } catch {
      // still unreachable: the device gate goes on
    }
  }

  private t(key: Key, values?: Record<string, string | number>): string {
    return translate(this.settings.language, key, values);
  }

  // --- the loop -----------------------------------------------------------------------------------

  async start(): Promise<void> {
    if (this.camera) return;
    $<HTMLButtonElement>("start").hidden = true;
    this.setStatus("waiting", this.t("waitingCamera"), "");
    try {
      this.camera = await Camera.open($<HTMLVideoElement>("preview"));
    } catch {
      $<HTMLButtonElement>("start").hidden = false;
      this.notice("cameraDenied");
      return;
    }
    this.hideNotice();
    $<HTMLButtonElement>("shutter").disabled = false;
    if (this.settings.mode === "exam") this.beginExam();
    void this.loop(this.camera);
  }

  private async loop(camera: Camera): Promise<void> {
    for (;;) {
      if (this.paused) await new Promise<void>((resolve) => (this.resume = resolve));
      if (this.exam) await this.exam.waitForStep((seconds) => this.showCountdown(seconds));
      if (this.shutterPressed) {
        this.shutterPressed = false;
        await this.capture(camera, "manual");
        continue;
      }
      await camera.freshFrame();
      const judged = this.gate === "device" && this.device ? await this.onDevice(camera, this.device) : await this.onServer(camera);
      if (!judged) continue; // a problem the page already shows; the loop retries
      const runComplete = this.auto.observe(judged.answer);
      this.showPreviewAnswer(judged.answer, judged.frame);
      if (runComplete) await this.capture(camera, "auto");
    }
  }

  private async onServer(camera: Camera): Promise<{ answer: api.Assessment; frame: { width: number; height: number } } | null> {
    const frame = await camera.previewFrame();
    const request = () => api.quality(this.client(), frame.blob, this.expectedStage(), PREVIEW_TIMEOUT_MS);
    const answer = await this.ask(request, true);
    return answer ? { answer, frame } : null;
  }

  private async onDevice(camera: Camera, device: DeviceGate): Promise<{ answer: api.Assessment; frame: { width: number; height: number } }> {
    const started = performance.now();
    this.stats.started();
    const pixels = camera.previewPixels();
    const answer = await device.assess(fromImageData(pixels), this.expectedStage(), this.settings.language);
    this.stats.finished(performance.now() - started, true);
    $("fps").textContent = this.t("fps", { fps: this.stats.framesPerSecond.toFixed(1) });
    void this.probeServer();
    return { answer, frame: { width: pixels.width, height: pixels.height } };
  }

  /** One request with the page's error handling: null when it failed (the notice says why). Preview
   * frames' round trips make the frames-per-second figure. */
  private async ask<T>(request: () => Promise<T>, preview = false): Promise<T | null> {
    const started = performance.now();
    this.stats.started();
    let answered = false;
    try {
      const answer = await request();
      answered = true;
      this.retryMs = 500;
      this.hideNotice();
      return answer;
    } catch (error) {
      await this.onFailure(error);
      return null;
    } finally {
      this.stats.finished(performance.now() - started, answered && preview);
      $("fps").textContent = this.t("fps", { fps: this.stats.framesPerSecond.toFixed(1) });
    }
  }

  private async onFailure(error: unknown): Promise<void> {
    if (error instanceof api.ProblemError && (error.status === 401 || error.status === 403)) {
      this.notice(this.settings.apiKey ? "keyRejected" : "keyNeeded");
      this.pause();
      this.openSettings();
      return;
    }
    if (error instanceof api.ProblemError && error.status !== 503 && error.status !== 504) {
      this.notice(null, error.message); // the service's own sentence names the fix
      await sleep(1000);
      return;
    }
    if (error instanceof api.UnreachableError && this.device) {
      this.setGate("device"); // the service is gone: the device gate answers until it is back
      return;
    }
    const busy = error instanceof api.ProblemError;
    this.notice(busy ? "busy" : "unreachable");
    const wait = busy && error.retryAfterSeconds ? error.retryAfterSeconds * 1000 : this.retryMs;
    this.retryMs = Math.min(RETRY_MAX_MS, this.retryMs * 2);
    await sleep(wait);
  }

  // --- capture and result ---------------------------------------------------------------------------

  private async capture(camera: Camera, trigger: CaptureRecord["trigger"]): Promise<void> {
    this.pause();
    this.setStatus("capturing", this.t("capturing"), "");
    const still = await camera.still();
    const record: CaptureRecord = {
      trigger,
      holdStillAt: trigger === "auto" ? this.holdStillAt : null,
      capturedAt: performance.now(),
      shownAt: null,
      source: still.source,
      width: still.width,
      height: still.height,
      decision: null,
    };
    this.telemetry.captures.push(record);
    this.auto.reset();
    this.holdStillAt = null;
    if (this.exam) {
      const complete = this.exam.record(still.blob);
      if (!complete) {
        this.clearBox();
        this.unpause();
        return;
      }
      if (this.gate === "device") {
        const photos = this.exam.photos();
        const stored = await this.store(photos.map((p) => p.blob), { stages: photos.map((p) => p.stage).join(",") });
        this.finishCapture(record, stored);
        return;
      }
      this.setStatus("assessing", this.t("examSending"), "");
      const answer = await this.ask(() => api.exam(this.client(), this.exam!.photos()));
      if (answer) this.showExamResult(answer);
      else this.unpause();
    } else if (this.gate === "device") {
      this.finishCapture(record, await this.store([still.blob]));
      return;
    } else {
      this.setStatus("assessing", this.t("assessing"), "");
      const answer = await this.ask(() => api.assess(this.client(), still.blob));
      if (answer) this.showAssessment(answer);
      else this.unpause();
    }
    const shown = !$("result").hidden;
    record.shownAt = shown ? performance.now() : null;
    record.decision = shown ? ($("result").dataset.decision ?? null) : null;
  }

  /** A still kept on the device: say so, and that it will be assessed once the service is back. */
  private finishCapture(record: CaptureRecord, stored: boolean): void {
    if (!stored) {
      this.unpause();
      return;
    }
    this.showResult("stored", [], [], this.t("storedAdvice"), null);
    $("result-title").textContent = this.t("storedTitle");
    record.shownAt = performance.now();
    record.decision = "stored";
  }

  private showAssessment(answer: api.Assessment): void {
    const diagnosed = answer.decision === "diagnosis" && answer.diagnosis !== null;
    const figures: [Key, string][] = [];
    if (diagnosed && answer.diagnosis) {
      figures.push(["probability", `${Math.round(answer.diagnosis.probability * 100)} %`]);
      figures.push(["resultDiagnosis", this.t(answer.diagnosis.referral ? "refer" : "noRefer")]);
      if (answer.lesion) figures.push(["lesionArea", `${(answer.lesion.area_fraction * 100).toFixed(1)} %`]);
    }
    this.showResult(
      diagnosed ? "diagnosis" : "recapture",
      answer.reasons.map((r) => r.code),
      figures,
      diagnosed ? "" : (answer.advice ?? ""),
      answer.lesion?.overlay_jpeg ?? null,
    );
  }

  private showExamResult(answer: api.Exam): void {
    const figures: [Key, string][] = [];
    if (answer.diagnosis) {
      figures.push(["probability", `${Math.round(answer.diagnosis.probability * 100)} %`]);
      figures.push(["resultDiagnosis", this.t(answer.diagnosis.referral ? "refer" : "noRefer")]);
    }
    const review = answer.review_index !== null ? answer.photos[answer.review_index]?.assessment : null;
    const reasons = answer.retake.flatMap((r) => r.reasons.map((reason) => reason.code));
    this.showResult(
      answer.decision,
      [...answer.reasons.map((r) => r.code), ...reasons],
      figures,
      answer.advice ?? "",
      review?.lesion?.overlay_jpeg ?? null,
    );
    const retakes = $("result-retakes");
    for (const retake of answer.retake) {
      const button = document.createElement("button");
      button.textContent = this.t("examRetake", { i: retake.index + 1 });
      button.title = retake.advice;
      button.dataset.testid = `exam-retake-${retake.index}`;
      button.addEventListener("click", () => this.retakeExamPhoto(retake.index));
      retakes.append(button);
    }
  }

  private showResult(
    decision: "diagnosis" | "recapture" | "stored",
    reasons: string[],
    figures: [Key, string][],
    advice: string,
    overlayJpeg: string | null,
  ): void {
    const result = $("result");
    result.dataset.decision = decision;
    result.dataset.reasons = reasons.join(",");
    $("result-title").textContent = this.t(decision === "diagnosis" ? "resultDiagnosis" : "resultRecapture");
    const list = $("result-figures");
    list.replaceChildren();
    for (const [label, value] of figures) {
      const term = document.createElement("dt");
      term.textContent = this.t(label);
      const description = document.createElement("dd");
      description.textContent = value;
      list.append(term, description);
    }
    $("result-advice").textContent = advice;
    $("result-retakes").replaceChildren();
    const image = $<HTMLImageElement>("result-image");
    image.hidden = overlayJpeg === null;
    if (overlayJpeg) image.src = `data:image/jpeg;base64,${overlayJpeg}`;
    result.hidden = false;
    this.clearBox();
    this.setStatus("idle", "", "");
  }

  private retake(): void {
    $("result").hidden = true;
    if (this.exam?.complete) this.exam.retakeLast();
    this.unpause();
  }

  private retakeExamPhoto(index: number): void {
    $("result").hidden = true;
    this.exam?.retake(index);
    this.unpause();
  }

  private nextPatient(): void {
    $("result").hidden = true;
    if (this.settings.mode === "exam") this.beginExam();
    this.unpause();
  }

  // --- the exam ---------------------------------------------------------------------------------------

  private beginExam(): void {
    this.exam = new ExamFlow(this.settings.aceticWaitSeconds);
    this.showStep();
  }

  private expectedStage(): string {
    return this.exam?.current.stage ?? "acetic";
  }

  private showStep(): void {
    const step = $("step");
    step.hidden = this.exam === null;
    if (this.exam) step.textContent = this.t(this.exam.current.title);
  }

  private showCountdown(seconds: number): void {
    if (seconds > 0) {
      this.clearBox();
      this.setStatus("waiting", this.t("stepApplyAcetic", { s: seconds }), "");
    } else {
      this.showStep();
    }
  }

  // --- what the worker sees -------------------------------------------------------------------------

  private showPreviewAnswer(answer: api.Assessment, frame: { width: number; height: number }): void {
    const accepted = answer.decision === "accept";
    drawBox($<HTMLCanvasElement>("box"), frame, answer.cervix.found ? answer.cervix.box : null, accepted);
    this.showStep();
    if (!accepted) {
      this.holdStillAt = null;
      const reason = answer.reasons[0];
      this.setStatus("recapture", reason?.message ?? "", answer.advice ?? "", reason?.code ?? "");
      return;
    }
    if (this.auto.count === 1 || this.holdStillAt === null) this.holdStillAt = performance.now();
    const frames = this.auto.frames;
    const text = frames > 0 ? this.t("holdStillCount", { k: this.auto.count, n: frames }) : this.t("readyShutter");
    this.setStatus(frames > 0 ? "hold" : "ready", text, "", "accept");
    const hold = $<HTMLProgressElement>("hold");
    hold.hidden = frames === 0;
    hold.max = Math.max(frames, 1);
    hold.value = Math.min(this.auto.count, frames);
  }

  private setStatus(state: string, text: string, advice: string, reason = ""): void {
    const status = $("status");
    status.dataset.state = state;
    status.dataset.reason = reason;
    $("status-text").textContent = text;
    $("advice").textContent = advice;
    if (state !== "hold" && state !== "ready") $("hold").hidden = true;
  }

  private notice(key: Key | null, text = ""): void {
    const notice = $("notice");
    notice.dataset.code = key ?? "problem";
    notice.textContent = key ? this.t(key) : text;
    notice.hidden = false;
  }

  private hideNotice(): void {
    $("notice").hidden = true;
  }

  private clearBox(): void {
    const canvas = $<HTMLCanvasElement>("box");
    canvas.getContext("2d")?.clearRect(0, 0, canvas.width, canvas.height);
  }

  // --- settings ---------------------------------------------------------------------------------------

  private openSettings(): void {
    $<HTMLSelectElement>("setting-language").value = this.settings.language;
    $<HTMLSelectElement>("setting-mode").value = this.settings.mode;
    $<HTMLInputElement>("setting-auto").value = String(this.settings.autoCaptureFrames);
    $<HTMLInputElement>("setting-wait").value = String(this.settings.aceticWaitSeconds);
    $<HTMLInputElement>("setting-key").value = this.settings.apiKey;
    const dialog = $<HTMLDialogElement>("settings");
    if (!dialog.open) dialog.showModal();
  }

  private closeSettings(): void {
    const dialog = $<HTMLDialogElement>("settings");
    if (dialog.returnValue === "save") {
      const modeBefore = this.settings.mode;
      stored.save({
        language: $<HTMLSelectElement>("setting-language").value as stored.Settings["language"],
        mode: $<HTMLSelectElement>("setting-mode").value as stored.Mode,
        autoCaptureFrames: Number($<HTMLInputElement>("setting-auto").value),
        aceticWaitSeconds: Number($<HTMLInputElement>("setting-wait").value),
        apiKey: $<HTMLInputElement>("setting-key").value,
        deviceThreads: this.settings.deviceThreads,
      });
      this.settings = stored.load(); // the stored values, checked and clamped
      this.applySettings();
      void this.loadDeviceGate(); // a key may be what it lacked
      if (this.settings.mode !== modeBefore) {
        this.exam = null;
        if (this.settings.mode === "exam" && this.camera) this.beginExam();
      }
    }
    if ($("notice").dataset.code?.startsWith("key")) this.hideNotice(); // other notices still hold
    this.unpause();
  }

  private applySettings(): void {
    translatePage(document, this.settings.language);
    this.auto.frames = this.settings.autoCaptureFrames;
    this.telemetry.mode = this.settings.mode;
    $("mode").textContent = this.t(this.settings.mode === "exam" ? "modeExam" : "modeSingle");
    this.showStep();
  }

  private client(): api.Client {
    return { language: this.settings.language, apiKey: this.settings.apiKey };
  }

  private pause(): void {
    this.paused = true;
  }

  private unpause(): void {
    if ($("result").hidden === false || $<HTMLDialogElement>("settings").open) return;
    this.paused = false;
    this.resume?.();
    this.resume = null;
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

const app = new CaptureApp();
(window as unknown as { cervigate: PageTelemetry }).cervigate = app.telemetry;

if ("serviceWorker" in navigator && window.isSecureContext) {
  // The shell (this page, its script, style and icons) is cached so the page opens without the network.
  navigator.serviceWorker.register("sw.js", { scope: "./" }).catch(() => undefined);
}
