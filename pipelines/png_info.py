"""A1111-compatible generation parameters in PNG text chunks (the ``parameters`` key), and image grids.

The text has AUTOMATIC1111's infotext layout, which A1111's "PNG Info" tab, CivitAI and ComfyUI
loaders read:

    <prompt, may span lines, keeps the <lora:...> tags>
    Negative prompt: <negative, may span lines>
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 64x64, Model hash: 0123456789, Model: tiny-sd, Lora hashes: "a: 0123456789ab, b: ...", Lyco adapters: "<lora:a:1>, <lora:b:0.5:0.8>", Version: lyco 0.1.0

Values that contain ``,`` ``:`` or a newline are JSON-quoted (A1111 ``quote``); the last line is the
key/value line. ``Lora hashes`` covers every adapter used (prompt tags and stack); ``Lyco adapters``
is lyco's addition: the adapters applied from the stack rather than from prompt tags, written in
tag syntax, so the settings of an image can be re-read completely.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from PIL import Image, PngImagePlugin

PARAMETERS_KEY = "parameters"
NEGATIVE_PREFIX = "Negative prompt:"
# key: "quoted, value" | value-without-comma ; keys start with a word character (A1111 re_param).
_PARAM = re.compile(r'\s*(\w[\w \-/+.]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")


@dataclass(frozen=True)
class ImageParameters:
    """Everything written into (and read back from) one image's ``parameters`` text."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = ""
    schedule_type: str | None = None
    cfg_scale: float = 7.0
    seed: int = 0
    width: int = 512
    height: int = 512
    model_hash: str | None = None
    model: str | None = None
    lora_hashes: Mapping[str, str] = field(default_factory=dict)
    lyco_adapters: tuple[str, ...] = ()
    extra: Mapping[str, str] = field(default_factory=dict)
    version: str | None = None


def quote(value: object) -> str:
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text and '"' not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return str(json.loads(text))
        except json.JSONDecodeError:
            return text
    return text


def _number(value: float) -> str:
    return f"{value:g}" if math.isfinite(value) else str(value)


def format_parameters(params: ImageParameters) -> str:
    """The A1111 infotext of one image."""
    pairs: list[tuple[str, object]] = [("Steps", params.steps), ("Sampler", params.sampler)]
    if params.schedule_type:
        pairs.append(("Schedule type", params.schedule_type))
    pairs += [("CFG scale", _number(params.cfg_scale)), ("Seed", params.seed), ("Size", f"{params.width}x{params.height}")]
    if params.model_hash:
        pairs.append(("Model hash", params.model_hash))
    if params.model:
        pairs.append(("Model", params.model))
    if params.lora_hashes:
        pairs.append(("Lora hashes", ", ".join(f"{name}: {h}" for name, h in params.lora_hashes.items())))
    if params.lyco_adapters:
        pairs.append(("Lyco adapters", ", ".join(params.lyco_adapters)))
    pairs += list(params.extra.items())
    if params.version:
        pairs.append(("Version", params.version))
    line = ", ".join(f"{key}: {quote(value)}" for key, value in pairs if value != "")
    text = params.prompt
    if params.negative_prompt:
        text += f"\n{NEGATIVE_PREFIX} {params.negative_prompt}"
    return f"{text}\n{line}"


def _split_pairs(line: str) -> dict[str, str] | None:
    pairs: dict[str, str] = {}
    position = 0
    while position < len(line):
        match = _PARAM.match(line, position)
        if match is None or match.end() == position:
            return None
        pairs[match.group(1).strip()] = unquote(match.group(2).strip())
        position = match.end()
    return pairs


def _split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(", ") if item.strip()]


def parse_parameters(text: str) -> ImageParameters:
    """Read an A1111 infotext back (lyco's own and A1111's); unknown keys land in `extra`."""
    lines = text.strip("\n").split("\n")
    pairs = _split_pairs(lines[-1]) if len(lines) > 1 or "Steps:" in lines[-1] else None
    if pairs is not None and len(pairs) >= 3:
        lines = lines[:-1]
    else:
        pairs = {}
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in lines:
        if line.startswith(NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PREFIX):].lstrip()
        (negative_lines if in_negative else prompt_lines).append(line)
    known = {"Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model", "Lora hashes", "Lyco adapters", "Version"}
    size = _SIZE.match(pairs.get("Size", ""))
    hashes = {}
    for item in _split_list(pairs.get("Lora hashes", "")):
        name, _, value = item.rpartition(": ")
        hashes[name.strip()] = value.strip()
    return ImageParameters(
        prompt="\n".join(prompt_lines),
        negative_prompt="\n".join(negative_lines),
        steps=int(pairs.get("Steps", 20)),
        sampler=pairs.get("Sampler", ""),
        schedule_type=pairs.get("Schedule type"),
        cfg_scale=float(pairs.get("CFG scale", 7.0)),
        seed=int(pairs.get("Seed", 0)),
        width=int(size.group(1)) if size else 512,
        height=int(size.group(2)) if size else 512,
        model_hash=pairs.get("Model hash"),
        model=pairs.get("Model"),
        lora_hashes=hashes,
        lyco_adapters=tuple(_split_list(pairs.get("Lyco adapters", ""))),
        extra={k: v for k, v in pairs.items() if k not in known},
        version=pairs.get("Version"),
    )


def save_png(image: Image.Image, path: str | os.PathLike, *, parameters: str, overwrite: bool = False) -> Path:
    """Write a PNG with the ``parameters`` text chunk; refuses to replace a file unless overwrite."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (--overwrite) or choose another output folder")
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, parameters)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)
    return path


def read_png_parameters(path: str | os.PathLike) -> str:
    """The ``parameters`` text of a PNG; KeyError naming the file when it has none."""
    with Image.open(path) as image:
        image.load()
        text = image.info.get(PARAMETERS_KEY)
    if text is None:
        raise KeyError(f"{path} has no '{PARAMETERS_KEY}' text chunk (not written by lyco-generate or A1111)")
    return text


def make_grid(images: Sequence[Image.Image], *, columns: int | None = None) -> Image.Image:
    """Images side by side in rows (A1111's default: a near-square grid)."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "black")
    for index, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((index % columns) * width, (index // columns) * height))
    return grid
