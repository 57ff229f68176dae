"""Key-format conversions on adapter state dicts (no model needed), and the `lyco-convert` command.

- kohya (`lora_unet_…`, `lora_te_…`, `lora_te1/2_…`; also reads `lycoris_…`) <-> diffusers/PEFT
  (`unet.<path>.lora_A.weight`, `text_encoder.text_model.<…>.lora_B.weight`);
- SDXL UNet naming SGM/LDM (`input_blocks_4_1_…`, what sd-scripts writes) <-> diffusers
  (`down_blocks_1_attentions_0_…`), using a `UNetLayout` (the standard SD / SDXL layouts below, or
  one built from a UNet with `UNetLayout.from_unet`);
- precision fp32 / fp16 / bf16 (every float tensor, `.alpha` included, as sd-scripts saves);
- `.ckpt` / `.pt` pickles -> safetensors, only when asked (`allow_pickle=True` / `--allow-pickle`),
  read with `torch.load(weights_only=True)` so no code in the file runs.

Kohya keys cannot be split back into module paths by rule (FORMAT.md §1.1: underscores inside names).
Readers with a model use a key table; without a model this module splits keys with the vocabulary of
SD1/SD2/SDXL module names (`down_blocks`, `to_q`, `time_emb_proj`, `self_attn`, …), checked in the
tests against every Linear/Conv of the real SD1.5 and SDXL architectures.

Diffusers format and alpha: diffusers/PEFT files have no `.alpha`. By default (`alpha="fold"`) the
scale alpha/r is multiplied into `lora_B`, so every reader (diffusers, ComfyUI, A1111, lyco) applies
the same ΔW; `alpha="metadata"` keeps the factors bit-exact and records r / lora_alpha /
rank_pattern / alpha_pattern per component in the `lora_adapter_metadata` JSON like diffusers'
`save_lora_weights` (read by diffusers and lyco; ignored by ComfyUI and A1111).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor

from .. import naming
from ..format import detect
from ..format.adapter_file import PEFT_METADATA_KEY, AdapterFile, ModuleEntry, parse_adapter
from ..format.container import AdapterFileError, read_tensors
from ..naming import UNetLayout
from ._common import SAVE_DTYPES, cast_tensors, record_history, resolve_dtype, write_adapter

# The block structure of every SD1.x / SD2.x UNet and of the SDXL base UNet (FORMAT.md §1.4).
SD_LAYOUT = UNetLayout(
    layers_per_block=2,
    down_has_attentions=(True, True, True, False),
    up_has_attentions=(False, True, True, True),
    down_has_downsampler=(True, True, True, False),
    up_has_upsampler=(True, True, True, False),
)
SDXL_LAYOUT = UNetLayout(
    layers_per_block=2,
    down_has_attentions=(False, True, True),
    up_has_attentions=(True, True, False),
    down_has_downsampler=(True, True, False),
    up_has_upsampler=(True, True, False),
)
FORMATS = ("kohya", "diffusers")
UNET_NAMINGS = ("sgm", "diffusers")
ALPHA_MODES = ("fold", "metadata")

# Module names of SD1/SD2/SDXL (diffusers and SGM/LDM UNets, HF CLIP) that contain underscores.
_VOCABULARY = frozenset({
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
    "proj_in", "proj_out", "conv_shortcut", "time_emb_proj", "conv_in", "conv_out", "conv_norm_out",
    "time_embedding", "add_embedding", "class_embedding", "linear_1", "linear_2",
    "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers",
    "skip_connection", "time_embed", "label_emb",
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "final_layer_norm",
    "layer_norm1", "layer_norm2", "text_projection", "token_embedding", "position_embedding",
})
_LONGEST = 3
_KOHYA_PARTS = (("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"), ("lora_te_", "text_encoder"))
_SGM_HEADS = ("input_blocks.", "middle_block.", "output_blocks.", "out.", "time_embed.", "label_emb.")


def default_layout(family: str | None) -> UNetLayout:
    return SDXL_LAYOUT if family == "sdxl" else SD_LAYOUT


@dataclass(frozen=True, order=True)
class ModuleId:
    """A module independent of key style: the model part and its diffusers module path (text
    encoders in the `text_model.` form)."""

    part: str
    path: str

    @property
    def qualified(self) -> str:
        return f"{self.part}.{self.path}"


def split_underscored(body: str) -> str:
    """`down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q` -> `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`."""
    tokens = body.split("_")
    out: list[str] = []
    i = 0
    while i < len(tokens):
        for width in range(min(_LONGEST, len(tokens) - i), 0, -1):
            joined = "_".join(tokens[i:i + width])
            if width == 1 or joined in _VOCABULARY:
                out.append(joined)
                i += width
                break
    return ".".join(out)


def parse_module_key(key: str, *, family: str | None = None, layout: UNetLayout | None = None) -> ModuleId | None:
    """The module a file's module key names (kohya diffusers-style or SGM, `lycoris_`, dotted PEFT),
    or None when the key has no recognisable prefix. SGM UNet names are mapped to diffusers paths with
    `layout` (default: the SDXL layout, unless family is sd1/sd2)."""
    head, dot, rest = key.partition(".")
    if dot and head in naming.PARTS:
        path = naming.canonical_text_encoder_path(rest) if head != "unet" else rest
        return ModuleId(head, path)
    if key.startswith(naming.LYCORIS_PREFIX + "_"):
        return ModuleId("unet", split_underscored(key[len(naming.LYCORIS_PREFIX) + 1:]))
    for prefix, part in _KOHYA_PARTS:
        if key.startswith(prefix):
            path = split_underscored(key[len(prefix):])
            if part != "unet":
                return ModuleId(part, naming.canonical_text_encoder_path(path))
            if path.startswith(_SGM_HEADS):
                chosen = layout or (SD_LAYOUT if family in ("sd1", "sd2") else SDXL_LAYOUT)
                try:
                    path = naming.unet_sgm_to_diffusers(path, chosen)
                except ValueError:
                    return None
            return ModuleId("unet", path)
    return None


def kohya_key(module: ModuleId, *, family: str, layout: UNetLayout | None = None, unet_naming: str | None = None) -> str:
    """The kohya module key: SD1/SD2 diffusers-style, SDXL SGM-style unless unet_naming says otherwise."""
    naming_style = unet_naming or ("sgm" if family == "sdxl" else "diffusers")
    if naming_style not in UNET_NAMINGS:
        raise ValueError(f"unet naming must be one of {UNET_NAMINGS}, got {naming_style!r}")
    if module.part == "unet":
        path = module.path
        if naming_style == "sgm":
            path = naming.unet_diffusers_to_sgm(path, layout or default_layout(family))
        return naming.module_key(naming.UNET_PREFIX, path)
    return naming.file_key(module.part, module.path, family=family)


def peft_module(module: ModuleId) -> str:
    return module.qualified


# ----- state-dict conversion ------------------------------------------------------------------------


@dataclass
class ConvertResult:
    tensors: dict[str, Tensor]
    metadata: dict[str, str]
    family: str
    skipped: list[str] = field(default_factory=list)


def detect_family(adapter: AdapterFile) -> str | None:
    """sd1 / sd2 / sdxl from key names and layer widths; from key names alone when the widths are not
    those of the real models (small test models), None when undecided."""
    shapes = {f"{key}.{suffix}": tuple(t.shape) for key, entry in adapter.modules.items() for suffix, t in entry.tensors.items()}
    return detect.detect_family_from_shapes(shapes) or detect.detect_family_from_keys(adapter.modules)[0]


def convert_adapter(
    adapter: AdapterFile | Mapping[str, Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    to: str,
    family: str | None = None,
    layout: UNetLayout | None = None,
    unet_naming: str | None = None,
    alpha: str = "fold",
    strict: bool = True,
) -> ConvertResult:
    """Rewrite every module of an adapter in the `to` format ("kohya" or "diffusers").

    family: sd1 / sd2 / sdxl; detected from key names and shapes when None (SDXL needs it for SGM
    names; sd1 and sd2 share one naming). Modules whose keys name no SD module, or that the target
    cannot hold (diffusers: only plain LoRA, no Tucker, DoRA only on the output axis), raise
    AdapterFileError, or are skipped and listed in `skipped` when strict=False."""
    if to not in FORMATS:
        raise ValueError(f"target format must be one of {FORMATS}, got {to!r}")
    if alpha not in ALPHA_MODES:
        raise ValueError(f"alpha mode must be one of {ALPHA_MODES}, got {alpha!r}")
    if not isinstance(adapter, AdapterFile):
        adapter = parse_adapter(adapter, metadata, strict=strict)
    family = family or detect_family(adapter) or "sd1"
    out: dict[str, Tensor] = {}
    skipped = list(adapter.unparsed_keys)
    problems: list[str] = []
    peft_alphas: dict[str, dict[str, tuple[int, float]]] = {}
    dora_parts: set[str] = set()
    for entry in adapter.modules.values():
        module = parse_module_key(entry.key, family=family, layout=layout)
        if module is None:
            problems.append(f"{entry.key}: not an SD1/SD2/SDXL module key")
            skipped.extend(entry.source_keys())
            continue
        try:
            if to == "kohya":
                written = _kohya_tensors(entry, kohya_key(module, family=family, layout=layout, unet_naming=unet_naming))
            else:
                written = _peft_tensors(entry, module, fold=alpha == "fold")
                if alpha == "metadata":
                    peft_alphas.setdefault(module.part, {})[module.path] = (entry.rank, _alpha_or_rank(entry))
                    if entry.dora_scale is not None:
                        dora_parts.add(module.part)
        except ValueError as err:
            problems.append(str(err))
            skipped.extend(entry.source_keys())
            continue
        clash = set(written) & set(out)
        if clash:
            raise AdapterFileError(adapter.source, f"two modules convert to the same keys {sorted(clash)[:4]}")
        out.update(written)
    if problems and strict:
        raise AdapterFileError(adapter.source, "cannot convert:\n  " + "\n  ".join(problems[:20])
                               + ("\n  ..." if len(problems) > 20 else "") + "\n(pass strict=False / --non-strict to drop these modules)")
    if not out:
        raise AdapterFileError(adapter.source, "nothing left to write after conversion")
    new_metadata = {k: v for k, v in adapter.metadata.items() if k != PEFT_METADATA_KEY}
    if peft_alphas:
        new_metadata[PEFT_METADATA_KEY] = json.dumps(_peft_config(peft_alphas, dora_parts), sort_keys=True)
    return ConvertResult(out, new_metadata, family, skipped)


def _alpha_or_rank(entry: ModuleEntry) -> float:
    return float(entry.alpha) if entry.alpha is not None else float(entry.rank or 1)


def _kohya_tensors(entry: ModuleEntry, key: str) -> dict[str, Tensor]:
    out = {f"{key}.{suffix}": tensor for suffix, tensor in entry.tensors.items()}
    if entry.alpha is not None:
        out[f"{key}.alpha"] = torch.tensor(float(entry.alpha))
    elif entry.rank is not None:  # no alpha anywhere (plain PEFT): scale 1, written explicitly (FORMAT.md §7)
        out[f"{key}.alpha"] = torch.tensor(float(entry.rank))
    if entry.dora_scale is not None:
        out[f"{key}.dora_scale"] = _kohya_dora(entry)
    return out


def _kohya_dora(entry: ModuleEntry) -> Tensor:
    scale = entry.dora_scale
    if scale.dim() != 1:
        return scale
    # PEFT's lora_magnitude_vector is (out,): LyCORIS's output-axis form is (out, 1[, 1, 1]).
    conv = entry.tensors.get("lora_down.weight", torch.empty(0, 0)).dim() == 4
    return scale.reshape(-1, 1, 1, 1) if conv else scale.reshape(-1, 1)


def _peft_tensors(entry: ModuleEntry, module: ModuleId, *, fold: bool) -> dict[str, Tensor]:
    if entry.algo != "lora" or "lora_mid.weight" in entry.tensors:
        kind = "LoRA with a Tucker mid" if entry.algo == "lora" else entry.algo
        raise ValueError(f"{entry.key}: {kind} has no diffusers/PEFT form (diffusers loads plain LoRA only)")
    down, up = entry.tensors["lora_down.weight"], entry.tensors["lora_up.weight"]
    scale = entry.scale
    if fold and scale != 1.0:
        up = (up.float() * scale).to(up.dtype)
    name = peft_module(module)
    out = {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up}
    if entry.dora_scale is not None:
        out[f"{name}.lora_magnitude_vector"] = _peft_dora(entry)
    return out


def _peft_dora(entry: ModuleEntry) -> Tensor:
    """PEFT's lora_magnitude_vector: (out,) for Linear, (1, out, 1, 1) for Conv2d."""
    scale = entry.dora_scale
    out_features = entry.tensors["lora_up.weight"].shape[0]
    if scale.dim() == 1 or (scale.shape[0] == out_features and all(d == 1 for d in scale.shape[1:])):
        conv = entry.tensors["lora_down.weight"].dim() == 4
        return scale.reshape(1, out_features, 1, 1) if conv else scale.reshape(out_features)
    raise ValueError(f"{entry.key}: input-axis DoRA (dora_scale {tuple(scale.shape)}) has no PEFT form (PEFT DoRA is output-axis)")


def _peft_config(alphas: Mapping[str, Mapping[str, tuple[int, float]]], dora_parts: set[str]) -> dict[str, object]:
    """`lora_adapter_metadata` as diffusers writes it: LoraConfig kwargs per component, prefixed `<part>.`."""
    config: dict[str, object] = {}
    for part, modules in alphas.items():
        rank = Counter(r for r, _ in modules.values()).most_common(1)[0][0]
        alpha = Counter(a for _, a in modules.values()).most_common(1)[0][0]
        config[f"{part}.r"] = rank
        config[f"{part}.lora_alpha"] = alpha
        config[f"{part}.rank_pattern"] = {_peft_pattern(p): r for p, (r, _) in modules.items() if r != rank}
        config[f"{part}.alpha_pattern"] = {_peft_pattern(p): a for p, (_, a) in modules.items() if a != alpha}
        config[f"{part}.target_modules"] = sorted(_peft_target(p) for p in modules)
        config[f"{part}.use_dora"] = part in dora_parts
    return config


def _peft_target(path: str) -> str:
    """PEFT matches target modules as name suffixes; without `text_model.` the name also fits the
    transformers-5 CLIPTextModel, whose modules are `encoder.layers...` (FORMAT.md §1.2)."""
    return path[len("text_model."):] if path.startswith("text_model.") else path


def _peft_pattern(path: str) -> str:
    # PEFT and lyco match patterns with re.match(rf"(.*\.)?({key})$", module_name).
    return re.escape(_peft_target(path))


# ----- files -----------------------------------------------------------------------------------------


def convert_file(
    source: str | Path,
    destination: str | Path,
    *,
    to: str | None = None,
    family: str | None = None,
    unet_naming: str | None = None,
    precision: str | None = None,
    alpha: str = "fold",
    allow_pickle: bool = False,
    strict: bool = True,
    overwrite: bool = False,
) -> ConvertResult:
    """Convert one file; `to=None` keeps every key as it is (precision / pickle conversion only)."""
    tensors, metadata = read_tensors(source, allow_pickle=allow_pickle)
    if to is None:
        result = ConvertResult(dict(tensors), dict(metadata), family or "")
    else:
        result = convert_adapter(parse_adapter(tensors, metadata, source=str(source), strict=strict), to=to,
                                 family=family, unet_naming=unet_naming, alpha=alpha, strict=strict)
    details: dict[str, object] = {"source": Path(source).name}
    if to is not None:
        details.update(to=to, family=result.family, alpha=alpha if to == "diffusers" else None,
                       unet_naming=unet_naming if to == "kohya" else None)
    if precision is not None:
        details["precision"] = precision
    if Path(source).suffix.lower() != ".safetensors":
        details["from_pickle"] = True
    result.metadata = record_history(result.metadata, "convert", {k: v for k, v in details.items() if v is not None})
    result.tensors = cast_tensors(result.tensors, resolve_dtype(precision))
    write_adapter(destination, result.tensors, result.metadata, overwrite=overwrite, hashes=to != "diffusers")
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lyco-convert",
        description="Convert an adapter between key formats (kohya <-> diffusers/PEFT, SDXL SGM <-> diffusers UNet "
        "names), precisions, and from .ckpt/.pt pickles to safetensors.",
    )
    parser.add_argument("source", help="adapter file (.safetensors; .ckpt/.pt/.pth/.bin with --allow-pickle)")
    parser.add_argument("destination", help="output .safetensors file")
    parser.add_argument("--to", choices=FORMATS, default=None, help="key format to write (default: keep the keys as they are)")
    parser.add_argument("--family", choices=naming.FAMILIES, default=None, help="base model family (default: detected from the keys)")
    parser.add_argument("--unet-naming", choices=UNET_NAMINGS, default=None,
                        help="kohya UNet names: sgm (SDXL default, what sd-scripts writes) or diffusers (SD1/SD2 default)")
    parser.add_argument("--alpha", choices=ALPHA_MODES, default="fold",
                        help="diffusers target: fold alpha/rank into lora_B (default, every reader agrees) or record it in "
                        "lora_adapter_metadata (bit-exact factors, read by diffusers and lyco)")
    parser.add_argument("--precision", choices=sorted(SAVE_DTYPES), default=None, help="cast every float tensor (default: keep)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read a .ckpt/.pt pickle (with torch.load(weights_only=True)); only for files you trust")
    parser.add_argument("--non-strict", action="store_true", help="drop modules that cannot be converted instead of failing")
    parser.add_argument("--overwrite", action="store_true", help="replace the destination if it exists")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.unet_naming and not args.to:
        args.to = "kohya"  # choosing UNet names means rewriting the kohya keys
    try:
        result = convert_file(
            args.source, args.destination, to=args.to, family=args.family, unet_naming=args.unet_naming,
            precision=args.precision, alpha=args.alpha, allow_pickle=args.allow_pickle, strict=not args.non_strict,
            overwrite=args.overwrite,
        )
    except (AdapterFileError, FileExistsError, ValueError) as err:
        print(f"lyco-convert: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.destination}: {len(result.tensors)} tensors" + (f", family {result.family}" if result.family else ""))
    if result.skipped:
        print(f"skipped {len(result.skipped)} keys: {', '.join(result.skipped[:8])}" + (" ..." if len(result.skipped) > 8 else ""))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
