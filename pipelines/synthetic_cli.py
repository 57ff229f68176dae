"""`lyco-dataset`: write synthetic training datasets and score images for the concept.

    lyco-dataset concept --out data/sks            # 16 concept images, 10 repeats, trigger "sks"
    lyco-dataset base --out data/shapes --n-images 144
    lyco-dataset score outputs/samples             # how strongly images show the concept
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from PIL import Image

from pipelines.synthetic import (
    CONCEPT_COLOUR,
    CONCEPT_SHAPE,
    CONCEPT_TRIGGER,
    concept_scores,
    write_base_dataset,
    write_concept_dataset,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lyco-dataset", description="Synthetic datasets for lyco.")
    commands = parser.add_subparsers(dest="command", required=True)

    concept = commands.add_parser(
        "concept",
        help=f"images of a concept the builtin models do not know ({CONCEPT_TRIGGER}: "
        f"a striped {CONCEPT_COLOUR} {CONCEPT_SHAPE}), kohya layout",
    )
    concept.add_argument("--out", required=True, help="output folder (must be new or empty)")
    concept.add_argument("--n-images", type=int, default=16)
    concept.add_argument("--repeats", type=int, default=10)
    concept.add_argument("--name", default=CONCEPT_TRIGGER, help="folder name after '<repeats>_'")
    concept.add_argument("--seed", type=int, default=0)
    concept.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")

    base = commands.add_parser("base", help="captioned colour/shape/background images, kohya layout")
    base.add_argument("--out", required=True, help="output folder (must be new or empty)")
    base.add_argument("--n-images", type=int, default=72)
    base.add_argument("--repeats", type=int, default=1)
    base.add_argument("--name", default="shapes")
    base.add_argument("--seed", type=int, default=0)
    base.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")

    score = commands.add_parser("score", help="concept score (0..1) of images in folders or files")
    score.add_argument("paths", nargs="+", help="image files or folders of images")
    return parser


def _image_paths(paths: Sequence[str]) -> list[Path]:
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path} does not exist")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "score":
            paths = _image_paths(args.paths)
            if not paths:
                print("no images found in " + ", ".join(args.paths), file=sys.stderr)
                return 2
            scores = []
            for path in paths:
                with Image.open(path) as image:
                    scores.extend(concept_scores([image.convert("RGB")]))
            for path, value in zip(paths, scores):
                print(f"{value:.3f}  {path}")
            print(f"mean concept score {sum(scores) / len(scores):.3f} over {len(scores)} images")
            return 0
        writer = write_concept_dataset if args.command == "concept" else write_base_dataset
        folder = writer(
            args.out, n_images=args.n_images, repeats=args.repeats, name=args.name,
            seed=args.seed, overwrite=args.overwrite,
        )
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"lyco-dataset: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.n_images} images + captions to {folder} ({args.repeats} repeats)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
