"""Shared helpers of the tools: layer shapes from file tensors, ΔW of a file module, metadata updates,
atomic adapter writes, progress bars and block weights."""
from __future__ import annotations

import json
import re
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence, TypeVar

import torch
from torch import Tensor

from ..algos import get_algorithm
from ..dora import dora_axis_of, dora_weight
from ..format.adapter_file import ModuleEntry
from ..format.container import serialize, write_atomic
from ..format.hashes import sd_scripts_hashes
from ..format.save import SAVE_DTYPES, resolve_dtype
from ..spec import LayerSpec

__all__ = ["SAVE_DTYPES", "resolve_dtype"]
T = TypeVar("T")
HISTORY_KEY = "lyco_history"

# SD module names of k x k (3x3) convolutions and of 1x1 convolutions, used only when a flattened LoHa /
# LoKr factor leaves the layer shape open and no model is given.
_SPATIAL_CONV = re.compile(r"(^|_)(conv1|conv2|conv_in|conv_out|downsamplers_0_conv|upsamplers_0_conv|in_layers_2|out_layers_3|op|\d+_[12]_conv|input_blocks_0_0|out_2)$")
_POINTWISE_CONV = re.compile(r"(^|_)(conv_shortcut|skip_connection)$")
_PROJ = re.compile(r"(^|_)(proj_in|proj_out)$")


# ----- shapes and ΔW ---------------------------------------------------------------------------------


def spec_for_shape(shape: Sequence[int]) -> LayerSpec:
    shape = tuple(int(d) for d in shape)
    if len(shape) == 2:
        return LayerSpec("linear", shape[0], shape[1])
    if len(shape) == 4:
        return LayerSpec("conv", shape[0], shape[1], kernel_size=(shape[2], shape[3]))
    raise ValueError(f"weight shape {shape} is neither Linear (2-D) nor Conv2d (4-D)")


def infer_weight_shape(entry: ModuleEntry, *, pointwise_proj: bool = False) -> tuple[int, ...]:
    """The weight shape of the layer a file module adapts, from its tensors alone.

    Exact for LoRA/LoCon, Tucker forms, full LoKr w2 and any module with a dora_scale. Flattened
    LoHa / LoKr factors (r, in·k·k) do not say whether the layer is Linear, 1x1 or k x k conv; then
    SD module names decide (3x3 for ResNet / sampler convs, 1x1 for shortcuts, and proj_in/proj_out
    are 1x1 convs when `pointwise_proj`, i.e. for SD1.x files). Pass the model's shapes when in doubt."""
    t = entry.tensors
    if entry.algo == "lora":
        up, down, mid = t["lora_up.weight"], t["lora_down.weight"], t.get("lora_mid.weight")
        if mid is not None:
            return (up.shape[0], down.shape[1], *mid.shape[2:])
        if down.dim() == 4 or up.dim() == 4:
            return (up.shape[0], down.shape[1], *(down.shape[2:] if down.dim() == 4 else (1, 1)))
        return (up.shape[0], down.shape[1])
    if entry.algo == "loha":
        if "hada_t1" in t:
            return (t["hada_w1_a"].shape[1], t["hada_w1_b"].shape[1], *t["hada_t1"].shape[2:])
        return _flat_shape(entry, t["hada_w1_a"].shape[0], t["hada_w1_b"].shape[1], pointwise_proj)
    w1 = t["lokr_w1"].shape if "lokr_w1" in t else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1])
    out_l, in_m = int(w1[0]), int(w1[1])
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
        return (out_l * w2.shape[0], in_m * w2.shape[1], *w2.shape[2:])
    if "lokr_t2" in t:
        return (out_l * t["lokr_w2_a"].shape[1], in_m * t["lokr_w2_b"].shape[1], *t["lokr_t2"].shape[2:])
    return _flat_shape(entry, out_l * t["lokr_w2_a"].shape[0], in_m * t["lokr_w2_b"].shape[1], pointwise_proj)


def _flat_shape(entry: ModuleEntry, out_f: int, flat_in: int, pointwise_proj: bool) -> tuple[int, ...]:
    scale = entry.dora_scale
    if scale is not None and scale.dim() == 4:  # a conv layer
        if scale.shape[0] == 1 and out_f != 1 and flat_in % scale.shape[1] == 0:  # input axis (1, in, 1, 1)
            in_f = int(scale.shape[1])
            side = round((flat_in // in_f) ** 0.5)
            if side * side * in_f == flat_in:
                return (out_f, in_f, side, side)
        return _conv_by_name(entry.key, out_f, flat_in, conv=True)
    return _conv_by_name(entry.key, out_f, flat_in, conv=False, pointwise_proj=pointwise_proj)


def _conv_by_name(key: str, out_f: int, flat_in: int, *, conv: bool, pointwise_proj: bool = False) -> tuple[int, ...]:
    name = key.replace(".", "_")
    if _SPATIAL_CONV.search(name) and flat_in % 9 == 0:
        return (out_f, flat_in // 9, 3, 3)
    if conv or _POINTWISE_CONV.search(name) or (pointwise_proj and _PROJ.search(name)):
        return (out_f, flat_in, 1, 1)
    return (out_f, flat_in)


def scaled_delta(entry: ModuleEntry, shape: Sequence[int], *, weight: Tensor | None = None, device: str | torch.device | None = None) -> Tensor:
    """What the module adds to the frozen weight at strength 1, in float32: s·ΔW, or for DoRA
    DoRA(W + s·ΔW) − W (which needs the base `weight`)."""
    spec = spec_for_shape(shape)
    params = {k: v.to(device=device, dtype=torch.float32) for k, v in entry.tensors.items()}
    delta = get_algorithm(entry.algo).delta_weight(params, spec) * entry.scale
    if entry.dora_scale is None:
        return delta
    if weight is None:
        raise ValueError(f"{entry.key}: a DoRA module's effect depends on the base weight; pass the base model")
    base = weight.to(device=delta.device, dtype=torch.float32)
    axis = dora_axis_of(tuple(entry.dora_scale.shape), tuple(shape))
    if axis is None:
        raise ValueError(f"{entry.key}: dora_scale {tuple(entry.dora_scale.shape)} fits neither axis of {tuple(shape)}")
    rest = [1] * (len(shape) - 2)
    dora = entry.dora_scale.to(device=delta.device, dtype=torch.float32)
    dora = dora.reshape(shape[0], 1, *rest) if axis == "output" else dora.reshape(1, shape[1], *rest)
    return dora_weight(base + delta, dora, axis) - base


def lora_factors(entry: ModuleEntry) -> tuple[Tensor, Tensor] | None:
    """(up (out, r), down (r, in·k·k)) in float32 of a LoRA module without Tucker mid (its unscaled
    ΔW = up @ down, whatever its dora_scale), else None."""
    if entry.algo != "lora" or "lora_mid.weight" in entry.tensors:
        return None
    return entry.tensors["lora_up.weight"].float().flatten(1), entry.tensors["lora_down.weight"].float().flatten(1)


def is_spatial(shape: Sequence[int]) -> bool:
    return len(shape) == 4 and tuple(shape[2:]) != (1, 1)


# ----- writing -----------------------------------------------------------------------------------------


def cast_tensors(tensors: Mapping[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    """Every floating tensor (alpha included, as sd-scripts' save_precision does) cast to dtype."""
    if dtype is None:
        return dict(tensors)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def write_adapter(
    path: str | Path,
    tensors: Mapping[str, Tensor],
    metadata: Mapping[str, str],
    *,
    overwrite: bool = False,
    hashes: bool = True,
) -> Path:
    """Atomic .safetensors write with string metadata and fresh sd-scripts hashes (sshs_*)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: adapters are written as .safetensors")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name or pass overwrite=True (--overwrite)")
    metadata = {k: str(v) for k, v in metadata.items() if not k.startswith("sshs_")}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    if hashes:
        metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = sd_scripts_hashes(tensors, metadata)
    return write_atomic(path, serialize(tensors, metadata), overwrite=overwrite)


def record_history(metadata: Mapping[str, str], tool: str, details: Mapping[str, object]) -> dict[str, str]:
    """A copy of the metadata with one more entry in the `lyco_history` JSON list (what was done, when)."""
    out = dict(metadata)
    try:
        history = json.loads(out.get(HISTORY_KEY, "[]"))
        history = history if isinstance(history, list) else []
    except json.JSONDecodeError:
        history = []
    history.append({"tool": tool, "date": datetime.now().replace(microsecond=0).isoformat(), **details})
    out[HISTORY_KEY] = json.dumps(history)
    out["modelspec.date"] = datetime.now().replace(microsecond=0).isoformat()
    return out


def lora_network_metadata(metadata: Mapping[str, str], tensors: Mapping[str, Tensor], *, dynamic: bool = False) -> dict[str, str]:
    """ss_network_* keys for a file that now holds plain LoRA/LoCon modules only."""
    out = dict(metadata)
    ranks = Counter(v.shape[0] for k, v in tensors.items() if k.endswith(".lora_down.weight"))
    alphas = Counter(float(v) for k, v in tensors.items() if k.endswith(".alpha"))
    conv_ranks = Counter(v.shape[0] for k, v in tensors.items() if k.endswith(".lora_down.weight") and v.dim() == 4 and v.shape[2:] != (1, 1))
    out["ss_network_module"] = "networks.lora"
    out["ss_network_dim"] = "Dynamic" if dynamic else str(ranks.most_common(1)[0][0]) if ranks else "0"
    out["ss_network_alpha"] = "Dynamic" if dynamic else _number(alphas.most_common(1)[0][0]) if alphas else "0"
    args = _json_dict(out.get("ss_network_args"))
    args = {k: v for k, v in args.items() if k in ("preset",)}
    if conv_ranks:
        args["conv_dim"] = "Dynamic" if dynamic else str(conv_ranks.most_common(1)[0][0])
    args["algo"] = "locon" if conv_ranks else "lora"
    out["ss_network_args"] = json.dumps(args)
    return out


def _json_dict(raw: str | None) -> dict[str, str]:
    try:
        value = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return {}
    return dict(value) if isinstance(value, dict) else {}


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


# ----- progress ------------------------------------------------------------------------------------------


def progress(items: Iterable[T], *, total: int | None = None, desc: str = "", enabled: bool = True) -> Iterator[T]:
    """A tqdm bar on stderr when tqdm is installed and enabled; plain iteration otherwise."""
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm is optional for the core
            pass
        else:
            yield from tqdm(items, total=total, desc=desc, leave=False, dynamic_ncols=True)
            return
    yield from items
