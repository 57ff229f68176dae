"""Captions: reading caption files, class-token fallback, tag shuffle with keep_tokens, dropouts."""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable


@dataclass(frozen=True)
class CaptionOptions:
    shuffle: bool = False
    keep_tokens: int = 0
    separator: str = ","
    dropout_rate: float = 0.0
    tag_dropout_rate: float = 0.0

    @property
    def varies(self) -> bool:
        """True when the same image can get a different caption from one use to the next."""
        return self.shuffle or self.dropout_rate > 0 or self.tag_dropout_rate > 0


def read_caption(image: Path, extension: str) -> str | None:
    """The first non-empty line of `<image stem><extension>`, or None when there is no such file."""
    path = image.with_suffix(extension if extension.startswith(".") else "." + extension)
    if not path.is_file():
        return None
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.strip():
            return line.strip()
    return ""


def split_tags(caption: str, separator: str) -> list[str]:
    return [tag.strip() for tag in caption.split(separator) if tag.strip()]


def process_caption(caption: str, options: CaptionOptions, rng: random.Random) -> str:
    """Apply caption dropout, tag dropout and shuffling (the first `keep_tokens` tags stay in place)."""
    if not options.varies:
        return caption
    if options.dropout_rate > 0 and rng.random() < options.dropout_rate:
        return ""
    tags = split_tags(caption, options.separator)
    fixed, rest = tags[: options.keep_tokens], tags[options.keep_tokens:]
    if options.tag_dropout_rate > 0:
        rest = [tag for tag in rest if rng.random() >= options.tag_dropout_rate]
    if options.shuffle:
        rng.shuffle(rest)
    return f"{options.separator} ".join(fixed + rest)


def tag_frequency(captions: Iterable[str], separator: str) -> dict[str, int]:
    """{tag: count} over captions, as sd-scripts' `ss_tag_frequency` per folder."""
    counts: Counter = Counter()
    for caption in captions:
        counts.update(split_tags(caption, separator))
    return dict(counts)
