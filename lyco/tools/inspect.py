"""`lyco-inspect FILE [--json]`: what an adapter file contains, without any model.

`inspect_adapter(path)` returns plain data (JSON-serialisable): modules per algorithm and variant,
rank / alpha histograms, dtypes, the base-model family and key naming scheme, the parts touched,
DoRA axes, keys no supported form explains, the metadata, and the stored hashes next to the
recomputed ones. `format_report(info)` renders it for people; `main()` is the console script.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Mapping, Sequence

from torch import Tensor

from ..format import detect
from ..format.adapter_file import AdapterFile, ModuleEntry, parse_adapter
from ..format.container import PICKLE_SUFFIXES, AdapterFileError, read_tensors
from ..format.hashes import file_model_hash, sd_scripts_hashes

_FAMILY_FROM_VERSION = (("sdxl_", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1"))
_METADATA_VALUE_LIMIT = 160
# Longest first: lora_te1_ must not count as lora_te_.
_PART_PREFIXES = (
    ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te_", "te"), ("lora_unet_", "unet"), ("oft_unet_", "unet"),
    ("lycoris_", "unet"), ("text_encoder_2.", "te2"), ("text_encoder.", "te"), ("unet.", "unet"),
)


def inspect_adapter(path: str | Path, *, allow_pickle: bool = False) -> dict:
    """Everything `lyco-inspect` reports about one adapter file, as plain data.

    Raises AdapterFileError (naming the file) for files lyco cannot read at all: not safetensors,
    truncated, NaN/Inf values, refused pickle, no adapter module. Keys of unsupported forms are
    listed under "unparsed_keys" instead of failing."""
    path = Path(path)
    tensors, metadata = read_tensors(path, allow_pickle=allow_pickle)
    adapter = parse_adapter(tensors, metadata, source=str(path), strict=False)
    is_pickle = path.suffix.lower() in PICKLE_SUFFIXES
    modules = list(adapter.modules.values())
    family, family_source, families = _family(adapter, tensors, metadata)
    _, scheme = detect.detect_family_from_keys(tensors)
    info = {
        "file": str(path),
        "size_bytes": path.stat().st_size,
        "container": "pickle" if is_pickle else "safetensors",
        "tensor_count": len(tensors),
        "parameter_count": sum(t.numel() for t in tensors.values()),
        "module_count": len(modules),
        "algorithms": _sorted_counts(Counter(entry.algo for entry in modules)),
        "variants": _sorted_counts(Counter(module_variant(entry) for entry in modules)),
        "ranks": _histogram((entry.rank for entry in modules), none="full"),
        "alphas": _histogram((None if entry.alpha is None else _number(entry.alpha) for entry in modules), none="missing"),
        "dora": _sorted_counts(Counter(dora_axis(entry) for entry in modules if entry.dora_scale is not None)),
        "dtypes": _sorted_counts(Counter(_dtype(t) for t in tensors.values())),
        "family": family,
        "family_source": family_source,
        "family_evidence": families,
        "naming_scheme": scheme,
        "parts": _sorted_counts(Counter(part_of(entry.key, dotted_second_encoder=_has_te2(adapter)) for entry in modules)),
        "unparsed_keys": sorted(adapter.unparsed_keys),
        "metadata": dict(sorted(metadata.items())),
        "hashes": _hashes(path, tensors, metadata, is_pickle),
    }
    info["warnings"] = _warnings(info)
    return info


# ----- per module --------------------------------------------------------------------------------


def module_variant(entry: ModuleEntry) -> str:
    """A short description of a module's layout, e.g. 'lora conv tucker', 'lokr w1 full + w2 low-rank'."""
    t = entry.tensors
    if entry.algo == "lora":
        down = t["lora_down.weight"]
        kind = "conv" if down.dim() == 4 and tuple(down.shape[2:]) != (1, 1) or "lora_mid.weight" in t else (
            "conv1x1" if down.dim() == 4 else "linear")
        text = f"lora {kind}" + (" tucker" if "lora_mid.weight" in t else "")
    elif entry.algo == "loha":
        conv = t["hada_w1_b"].dim() > 2 or "hada_t1" in t
        text = "loha " + ("conv tucker" if "hada_t1" in t else ("conv" if conv else "matrix"))
    else:
        w1 = "w1 low-rank" if "lokr_w1_a" in t else "w1 full"
        if "lokr_t2" in t:
            w2 = "w2 tucker"
        elif "lokr_w2" in t:
            w2 = "w2 full"
        else:
            w2 = "w2 low-rank"
        text = f"lokr {w1} + {w2}"
    if entry.dora_scale is not None:
        text += f" + dora({dora_axis(entry)})"
    return text


def dora_axis(entry: ModuleEntry) -> str:
    """'output' for (out,), (out, 1[, 1, 1]); 'input' for (1, in[, 1, 1]); from the dora_scale shape alone."""
    shape = tuple(entry.dora_scale.shape) if entry.dora_scale is not None else ()
    if len(shape) == 1 or (len(shape) >= 2 and shape[1] == 1 and shape[0] != 1):
        return "output"
    if len(shape) >= 2 and shape[0] == 1 and all(d == 1 for d in shape[2:]):
        return "input" if shape[1] != 1 else "unknown"
    return "unknown"


def part_of(key: str, *, dotted_second_encoder: bool = False) -> str:
    """unet, te (the only text encoder, SD1/SD2 naming), te1, te2, or 'other'."""
    for prefix, part in _PART_PREFIXES:
        if key.startswith(prefix):
            return "te1" if part == "te" and prefix == "text_encoder." and dotted_second_encoder else part
    return "other"


def _has_te2(adapter: AdapterFile) -> bool:
    return any(key.startswith(("text_encoder_2.", "lora_te2_")) for key in adapter.modules)


# ----- file level --------------------------------------------------------------------------------


def family_from_metadata(metadata: Mapping[str, str]) -> str | None:
    version = metadata.get("ss_base_model_version", "")
    for prefix, family in _FAMILY_FROM_VERSION:
        if version.startswith(prefix):
            return family
    architecture = metadata.get("modelspec.architecture", "")
    if architecture.startswith("stable-diffusion-xl"):
        return "sdxl"
    if architecture.startswith("stable-diffusion-v2"):
        return "sd2"
    if architecture.startswith("stable-diffusion-v1"):
        return "sd1"
    return None


def _family(adapter: AdapterFile, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> tuple[str | None, str | None, dict]:
    """(family, which evidence decided it, every piece of evidence). Tensor shapes decide first,
    then key names, then the metadata the writer claims."""
    evidence = {
        "shapes": detect.detect_family_from_shapes({k: tuple(t.shape) for k, t in tensors.items()}),
        "keys": detect.detect_family_from_keys(tensors)[0],
        "metadata": family_from_metadata(metadata),
    }
    for source in ("shapes", "keys", "metadata"):
        if evidence[source] is not None:
            return evidence[source], source, evidence
    return None, None, evidence


def _hashes(path: Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str], is_pickle: bool) -> dict:
    stored_model = metadata.get("sshs_model_hash")
    stored_legacy = metadata.get("sshs_legacy_hash")
    if is_pickle:
        model = legacy = None
    else:
        model = file_model_hash(str(path))
        legacy = sd_scripts_hashes(tensors, metadata)[1]
    style = None
    if stored_model is not None:
        # LyCORIS writes "0x" + sha256 over tensors serialised one at a time (FORMAT.md §3.4).
        style = "lycoris" if stored_model.startswith("0x") else "sd-scripts"
    return {
        "stored_model_hash": stored_model,
        "stored_legacy_hash": stored_legacy,
        "model_hash": model,
        "legacy_hash": legacy,
        "stored_hash_style": style,
        "model_hash_matches": None if stored_model is None or model is None else stored_model == model,
        "legacy_hash_matches": None if stored_legacy is None or legacy is None else stored_legacy == legacy,
    }


def _warnings(info: dict) -> list[str]:
    warnings = []
    hashes = info["hashes"]
    if hashes["model_hash_matches"] is False:
        if hashes["stored_hash_style"] == "lycoris":
            warnings.append("sshs_model_hash is LyCORIS-style (0x..., per tensor); A1111 shows it instead of the data-section hash")
        else:
            warnings.append("sshs_model_hash does not match the file's data section: the tensors changed after the hash was written")
    if hashes["legacy_hash_matches"] is False:
        warnings.append("sshs_legacy_hash does not match (it also depends on the ss_* metadata)")
    claimed = info["family_evidence"]["metadata"]
    if claimed is not None and info["family"] is not None and claimed != info["family"]:
        warnings.append(f"metadata says {claimed} but the tensors say {info['family']}")
    if info["unparsed_keys"]:
        warnings.append(f"{len(info['unparsed_keys'])} keys belong to no supported adapter form and would be skipped")
    if "missing" in info["alphas"]:
        warnings.append(f"{info['alphas']['missing']} modules have no alpha (applied with scale 1)")
    if info["naming_scheme"] == "mixed":
        warnings.append("the file mixes UNet naming schemes (diffusers drops the SGM-named keys of such files)")
    return warnings


# ----- helpers -----------------------------------------------------------------------------------


def _dtype(tensor: Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _number(value: float) -> str:
    if math.isfinite(value) and float(value).is_integer():
        return str(int(value))
    return f"{value:.6g}"


def _histogram(values, *, none: str) -> dict[str, int]:
    """Counts keyed by str(value) in numeric order; None (a LoKr without rank, a missing alpha) is `none`, last."""
    counts = Counter(values)

    def order(item):
        try:
            return (0, float(item[0]))
        except (TypeError, ValueError):
            return (1, 0.0)

    return {(none if key is None else str(key)): n for key, n in sorted(counts.items(), key=order)}


def _sorted_counts(counts: Counter) -> dict[str, int]:
    return {str(k): n for k, n in sorted(counts.items(), key=lambda item: (-item[1], str(item[0])))}


def _counts_text(counts: Mapping[str, int], sep: str = ", ") -> str:
    return sep.join(f"{name} ×{n}" for name, n in counts.items()) or "none"


def _size_text(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


def format_report(info: Mapping) -> str:
    """The human-readable report of `inspect_adapter`'s result."""
    hashes = info["hashes"]
    lines = [
        f"File:       {info['file']} ({_size_text(info['size_bytes'])}, {info['container']})",
        f"Modules:    {info['module_count']} ({_counts_text(info['parts'])}); {info['tensor_count']} tensors, "
        f"{info['parameter_count']:,} parameters",
        f"Algorithms: {_counts_text(info['algorithms'])}",
        f"Variants:   {_counts_text(info['variants'], '; ')}",
        f"Ranks:      {_counts_text(info['ranks'])}",
        f"Alphas:     {_counts_text(info['alphas'])}",
        f"DoRA:       {_counts_text(info['dora'])}",
        f"Dtypes:     {_counts_text(info['dtypes'])}",
        f"Base model: {info['family'] or 'unknown'}"
        + (f" (from {info['family_source']})" if info["family_source"] else " (neither shapes, keys nor metadata decide it)"),
        f"Naming:     {info['naming_scheme']}",
        "Hashes:     " + _hash_text("sshs_model_hash", hashes["stored_model_hash"], hashes["model_hash"], hashes["model_hash_matches"]),
        "            " + _hash_text("sshs_legacy_hash", hashes["stored_legacy_hash"], hashes["legacy_hash"], hashes["legacy_hash_matches"]),
    ]
    if info["unparsed_keys"]:
        shown = info["unparsed_keys"][:10]
        more = len(info["unparsed_keys"]) - len(shown)
        lines.append(f"Unparsed:   {', '.join(shown)}" + (f", ... ({more} more)" if more else ""))
    for warning in info["warnings"]:
        lines.append(f"Warning:    {warning}")
    metadata = info["metadata"]
    lines.append(f"Metadata:   {len(metadata)} keys" + (":" if metadata else ""))
    for key, value in metadata.items():
        text = value if len(value) <= _METADATA_VALUE_LIMIT else value[:_METADATA_VALUE_LIMIT] + f"... ({len(value)} chars)"
        lines.append(f"  {key}: {text}")
    return "\n".join(lines)


def _hash_text(name: str, stored: str | None, computed: str | None, matches: bool | None) -> str:
    if computed is None:
        return f"{name}: {stored or 'not stored'} (no data section to check in a pickle file)"
    if stored is None:
        return f"{name}: not stored (computed {computed})"
    verdict = "matches the file" if matches else f"MISMATCH, computed {computed}"
    return f"{name}: {stored} ({verdict})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lyco-inspect",
        description="Show what a LoRA/LoHa/LoKr adapter file contains: algorithms, ranks, alphas, dtypes, "
        "base model family, key naming scheme, metadata and hashes.",
    )
    parser.add_argument("file", help="adapter file (.safetensors; .ckpt/.pt only with --allow-pickle)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of the report")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read pickle checkpoints (loaded with weights_only=True); only for files you trust")
    args = parser.parse_args(argv)
    try:
        info = inspect_adapter(args.file, allow_pickle=args.allow_pickle)
    except AdapterFileError as err:
        print(f"lyco-inspect: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"lyco-inspect: error: {args.file}: {err.strerror or err}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
