"""AUTOMATIC1111 prompt tags for adapters: ``<lora:name:w>``, ``<lora:name:te_w:unet_w>``, ``te=``, ``unet=``, ``lbw=``.

Rules (A1111 v1.10 extensions-builtin/Lora + sd-webui-lora-block-weight):

* a tag is ``<kind:item:item:...>`` with kind ``lora`` or ``lyco`` (the old LyCORIS extension's
  alias); items are split at ``:``; an item containing ``=`` is a named argument;
* first positional after the name = text-encoder multiplier (default 1), second = UNet multiplier
  (default: the text-encoder one), so ``<lora:x:0.7>`` sets both to 0.7; ``te=`` / ``unet=`` override;
* ``lbw=`` (or lbw's positional form: a non-numeric last item, ``<lora:x:1:OUTALL>``) gives block
  weights: a preset name or comma-separated values (see pipelines.block_weights);
* the tag text is removed from the prompt and nothing else is changed (A1111 leaves the
  surrounding spaces and commas);
* names are resolved against a folder of adapter files by file name without extension, or by the
  path relative to the folder (``styles/ink``); an unknown name is an error listing what is there.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Union

TAG_KINDS = ("lora", "lyco")
NAMED_ARGUMENTS = ("te", "unet", "lbw")
ADAPTER_SUFFIXES = (".safetensors",)
# Any <word:...> is an A1111 extra-network tag; lyco applies the lora/lyco kinds.
_TAG = re.compile(r"<(\w+):([^>]+)>")
BlockSpec = Union[str, tuple[float, ...]]


class PromptTagError(ValueError):
    """A malformed tag or an unknown adapter name; the message shows the tag and how to fix it."""


@dataclass(frozen=True)
class AdapterTag:
    """One parsed tag. `lbw` is a preset name or block-weight values, None when absent."""

    name: str
    te: float = 1.0
    unet: float = 1.0
    lbw: BlockSpec | None = None
    text: str = ""

    def format(self) -> str:
        """The canonical tag text: ``<lora:name:te:unet>`` (+ ``:lbw=...``)."""
        return format_tag(self.name, te=self.te, unet=self.unet, lbw=self.lbw)


def _number(text: str, *, what: str, tag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise PromptTagError(f"{tag}: {what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise PromptTagError(f"{tag}: {what} {text!r} is not finite")
    return value


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _lbw_value(text: str) -> BlockSpec:
    text = text.strip()
    if "," in text:
        return tuple(_number(v.strip(), what="block weight", tag=f"lbw={text}") for v in text.split(","))
    return text


def parse_tag(kind: str, body: str, *, text: str | None = None) -> AdapterTag:
    """Parse the part of ``<kind:body>`` after the kind."""
    tag = text or f"<{kind}:{body}>"
    if kind not in TAG_KINDS:
        raise PromptTagError(f"{tag}: lyco applies <lora:...> and <lyco:...> tags only; remove this tag from the prompt")
    name, *items = [item.strip() for item in body.split(":")]
    if not name:
        raise PromptTagError(f"{tag}: the adapter name is empty; write <lora:NAME:STRENGTH>")
    positional: list[str] = []
    named: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            positional.append(item)
            continue
        key = key.strip()
        if key not in NAMED_ARGUMENTS:
            raise PromptTagError(f"{tag}: unknown argument {key}=; lyco understands {', '.join(a + '=' for a in NAMED_ARGUMENTS)}")
        if key in named:
            raise PromptTagError(f"{tag}: {key}= is given twice")
        named[key] = value.strip()
    lbw: BlockSpec | None = _lbw_value(named["lbw"]) if "lbw" in named else None
    if positional and not _is_number(positional[-1]) and len(positional) >= 2:
        if lbw is not None:
            raise PromptTagError(f"{tag}: block weights are given twice (positional and lbw=)")
        lbw = _lbw_value(positional.pop())
    if len(positional) > 2:
        raise PromptTagError(f"{tag}: too many values; write <{kind}:name:STRENGTH>, <{kind}:name:TE:UNET> or add lbw=")
    te = _number(positional[0], what="strength", tag=tag) if positional else 1.0
    unet = _number(positional[1], what="UNet strength", tag=tag) if len(positional) > 1 else te
    if "te" in named:
        te = _number(named["te"], what="te=", tag=tag)
    if "unet" in named:
        unet = _number(named["unet"], what="unet=", tag=tag)
    return AdapterTag(name=name, te=te, unet=unet, lbw=lbw, text=tag)


def parse_prompt(prompt: str) -> tuple[str, list[AdapterTag]]:
    """(prompt without the tags, tags in order). The same name twice is an error."""
    tags: list[AdapterTag] = []
    for match in _TAG.finditer(prompt):
        tags.append(parse_tag(match.group(1), match.group(2), text=match.group(0)))
    seen: dict[str, str] = {}
    for tag in tags:
        if tag.name in seen:
            raise PromptTagError(f"adapter {tag.name!r} is tagged twice ({seen[tag.name]} and {tag.text}); keep one tag per adapter")
        seen[tag.name] = tag.text
    return _TAG.sub("", prompt), tags


def strip_tags(prompt: str) -> str:
    """The prompt with every extra-network tag removed (used for negative prompts, which A1111 never applies)."""
    return _TAG.sub("", prompt)


def _format_number(value: float) -> str:
    return f"{value:g}"


def format_tag(name: str, *, te: float = 1.0, unet: float | None = None, lbw: BlockSpec | None = None) -> str:
    """``<lora:name:w>`` when te == unet, else ``<lora:name:te:unet>``; plus ``:lbw=...``."""
    unet = te if unet is None else unet
    text = f"<lora:{name}:{_format_number(te)}"
    if unet != te:
        text += f":{_format_number(unet)}"
    if lbw is not None:
        text += ":lbw=" + (lbw if isinstance(lbw, str) else ",".join(_format_number(v) for v in lbw))
    return text + ">"


class AdapterLibrary:
    """The adapter files of a folder (recursive), addressable by name as prompt tags use them."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise FileNotFoundError(f"adapter folder {self.folder} does not exist; pass an existing folder (--adapter-dir)")
        self._by_path: dict[str, Path] = {}
        self._by_stem: dict[str, list[Path]] = {}
        for file in sorted(self.folder.rglob("*")):
            if file.is_file() and file.suffix.lower() in ADAPTER_SUFFIXES:
                relative = file.relative_to(self.folder).with_suffix("").as_posix()
                self._by_path[relative] = file
                self._by_stem.setdefault(file.stem, []).append(file)

    def names(self) -> list[str]:
        """Every name a tag may use: the file stem (when unique) or the relative path."""
        names = {stem for stem, files in self._by_stem.items() if len(files) == 1}
        names |= {rel for rel in self._by_path if "/" in rel}
        return sorted(names)

    def resolve(self, name: str) -> Path:
        if name in self._by_path:
            return self._by_path[name]
        files = self._by_stem.get(name)
        if files is None:
            folded = [stem for stem in self._by_stem if stem.casefold() == name.casefold()]
            if len(folded) == 1:
                files = self._by_stem[folded[0]]
        if files and len(files) == 1:
            return files[0]
        if files:
            choices = ", ".join(f.relative_to(self.folder).with_suffix("").as_posix() for f in files)
            raise PromptTagError(f"adapter name {name!r} matches several files in {self.folder}: {choices}; use the folder/name form")
        raise PromptTagError(f"no adapter named {name!r} in {self.folder}; available: {_listing(self.names())}")

    def __contains__(self, name: object) -> bool:
        try:
            self.resolve(str(name))
        except PromptTagError:
            return False
        return True


def _listing(names: Iterable[str], limit: int = 40) -> str:
    names = list(names)
    if not names:
        return "(none: the folder has no .safetensors files)"
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
