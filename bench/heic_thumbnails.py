"""Do sound HEICs agree with their own thumbnails? Atlas photos saved as HEICs in the layouts phones write,
each decoded in full and compared with its thumbnail as the service's damage check does
(`service.io.decoding.thumbnail_disagreement`): the largest and median disagreement per layout, and how
many would be refused at `THUMBNAIL_DISAGREEMENT`. These are the figures behind that threshold (README
"Bad input"). Photos are encoded with x265's fastest preset, the coarsest thumbnail coding a writer might use.

`python -m bench.heic_thumbnails` (all 209 photos, the iPhone layout: about 12 minutes here);
`--every 10 --layouts ...` for a subset (each 12 MP photo takes a few seconds per layout).
"""

from __future__ import annotations

import argparse
import statistics

from PIL import Image

from bench.run import ATLAS, PHONE_SIZE, heic
from service.io import decoding
from service.io.decoding import THUMBNAIL_DISAGREEMENT, register_heif, thumbnail_disagreement

# name: (picture size, thumbnail longest sides, quality)
LAYOUTS: dict[str, tuple[tuple[int, int], list[int], int]] = {
    "iphone": (PHONE_SIZE, [320], 90),
    "portrait": ((PHONE_SIZE[1], PHONE_SIZE[0]), [320], 90),
    "8mp-portrait": ((2448, 3264), [320], 90),
    "two-thumbnails": (PHONE_SIZE, [320, 1024], 90),
    "128-thumbnail": (PHONE_SIZE, [128], 90),
    "quality-50": (PHONE_SIZE, [320], 50),
    "800x600": ((800, 600), [160], 90),
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--every", type=int, default=1, help="every n-th atlas photo (sorted by path)")
    parser.add_argument("--first", type=int, default=0, help="index of the first photo taken")
    parser.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=["iphone"])
    return parser


def disagreement(photo: Image.Image, layout: str) -> int | None:
    size, thumbnails, quality = LAYOUTS[layout]
    data = heic(photo.resize(size, Image.Resampling.LANCZOS), thumbnails, quality, preset="ultrafast")
    picture, _, _ = decoding._decode(data, draft_side=None)  # no draft: decoded in full
    return thumbnail_disagreement(picture, data)


def main(args: argparse.Namespace) -> None:
    register_heif(2)
    decoding.check_heif_thumbnail = lambda picture, data: None  # measure every photo, refuse none
    paths = sorted(ATLAS.glob("images_*/case_*/*.jpg"))[args.first :: args.every]
    values: dict[str, list[int]] = {layout: [] for layout in args.layouts}
    for path in paths:
        photo = Image.open(path).convert("RGB")
        for layout in args.layouts:
            value = disagreement(photo, layout)
            if value is not None:
                values[layout].append(value)
    for layout, found in values.items():
        refused = sum(value > THUMBNAIL_DISAGREEMENT for value in found)
        median = statistics.median(found) if found else 0
        print(
            f"{layout}: {len(found)} of {len(paths)} photos compared, disagreement max "
            f"{max(found, default=0)}, median {median:g}, over {THUMBNAIL_DISAGREEMENT}: {refused}",
            flush=True,
        )


if __name__ == "__main__":
    main(get_args_parser().parse_args())
