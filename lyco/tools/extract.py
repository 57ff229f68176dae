"""Extract a LoRA/LoCon from a base model and a fine-tuned model by SVD of the weight difference
(sd-scripts `networks/extract_lora_from_models.py`, LyCORIS `tools/extract_locon.py`).

Targets are chosen with a lyco preset (default "attn-mlp" = sd-scripts' networks.lora modules; with a
conv rank also the ResNet / sampler convs, like sd-scripts' --conv_dim). Per layer, ΔW = W_tuned − W_base
(float32) is cut to a fixed rank or a dynamic one (lyco.tools.svd) and written in the kohya layout
(conv k x k: down (r, in, k, k), up (out, r, 1, 1)) with alpha = rank (scale 1), so the adapter at
strength 1 reproduces the truncated ΔW. Layers whose max |ΔW| <= `min_diff` are skipped (unchanged
layers are always skipped); `clamp_quantile` clips outliers of the factors like sd-scripts (lossy).
Each layer reports the fraction of ||ΔW||_F it keeps (and the energy, its square).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor, nn

from .. import naming
from ..format.metadata import MODELSPEC_VERSION, BaseModelInfo, architecture, base_model_version
from ..network import detect_family
from ..settings import NetworkConfig
from ..targets import TEXT_ENCODER_PARTS, select_candidates
from ._common import is_spatial, lora_network_metadata, progress, record_history
from .merge import _layout_of
from .svd import RankRule, as_matrix, lora_tensors, truncated_svd


@dataclass(frozen=True)
class ExtractedLayer:
    key: str
    shape: tuple[int, ...]
    max_diff: float
    rank: int = 0  # 0 when skipped
    fro_retained: float = 0.0

    @property
    def skipped(self) -> bool:
        return self.rank == 0

    @property
    def energy_retained(self) -> float:
        return self.fro_retained ** 2

    def line(self) -> str:
        if self.skipped:
            return f"{self.key:<72} skipped (max |ΔW| {self.max_diff:.3g})"
        return f"{self.key:<72} rank {self.rank:<4} fro {self.fro_retained:7.2%}  energy {self.energy_retained:7.2%}"


@dataclass
class ExtractResult:
    tensors: dict[str, Tensor]
    metadata: dict[str, str]
    family: str
    layers: list[ExtractedLayer] = field(default_factory=list)

    @property
    def extracted(self) -> list[ExtractedLayer]:
        return [layer for layer in self.layers if not layer.skipped]

    def summary(self) -> str:
        kept = self.extracted
        if not kept:
            return f"no layer differs by more than min_diff ({len(self.layers)} compared)"
        fro = sum(layer.fro_retained for layer in kept) / len(kept)
        return f"{len(kept)} layers extracted, {len(self.layers) - len(kept)} skipped; mean Frobenius norm retained {fro:.2%}"


@torch.no_grad()
def extract_adapter(
    base: Mapping[str, nn.Module],
    tuned: Mapping[str, nn.Module],
    *,
    rank: int | None = 4,
    conv_rank: int | None = None,
    method: str | None = None,
    param: float | None = None,
    clamp_quantile: float | None = None,
    min_diff: float = 0.0,
    preset: str = "attn-mlp",
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    family: str | None = None,
    v_prediction: bool = False,
    device: str | torch.device | None = None,
    show_progress: bool = False,
) -> ExtractResult:
    """A LoRA/LoCon approximating `tuned − base` (both {part: module} of the same architecture)."""
    family = family or detect_family(base)
    rule = RankRule(rank, method, param)
    conv_rule = RankRule(conv_rank if conv_rank is not None else rank, method, param)
    config = NetworkConfig(rank=rank or 1, conv_rank=conv_rank, preset=preset, include=include, exclude=exclude,
                           parts=tuple(p for p in ("unet",) + TEXT_ENCODER_PARTS if p in base))
    layout = _layout_of(base, family)
    candidates = select_candidates(base, config.selection(), lambda part, path: f"{part}.{naming.canonical_text_encoder_path(path) if part != 'unet' else path}")
    if not candidates:
        raise ValueError(f"preset {preset!r} selects no layer of the model parts {sorted(base)}")
    tensors: dict[str, Tensor] = {}
    layers: list[ExtractedLayer] = []
    for candidate in progress(candidates, total=len(candidates), desc="extract", enabled=show_progress):
        key = naming.file_key(candidate.part, candidate.path, family=family, layout=layout if candidate.part == "unet" else None)
        w_base = naming.innermost_module(candidate.module).weight
        w_tuned = _tuned_weight(tuned, candidate.part, candidate.path, w_base)
        diff = w_tuned.to(device=device or w_base.device, dtype=torch.float32) - w_base.to(device=device or w_base.device, dtype=torch.float32)
        shape = tuple(diff.shape)
        max_diff = float(diff.abs().max()) if diff.numel() else 0.0
        if max_diff <= min_diff:
            layers.append(ExtractedLayer(key, shape, max_diff))
            continue
        low = truncated_svd(as_matrix(diff), conv_rule if is_spatial(shape) else rule, clamp_quantile=clamp_quantile, device=device)
        tensors.update({f"{key}.{k}": v for k, v in lora_tensors(low, shape).items()})
        tensors[f"{key}.alpha"] = torch.tensor(float(low.rank))
        layers.append(ExtractedLayer(key, shape, max_diff, low.rank, low.fro_retained))
    if not tensors:
        raise ValueError(f"the models do not differ in any of the {len(layers)} selected layers (min_diff={min_diff})")
    info = BaseModelInfo(family=family, v_prediction=v_prediction)
    metadata = lora_network_metadata(_base_metadata(info), tensors, dynamic=method is not None)
    details = {"rank": rank, "conv_rank": conv_rank, "method": method, "param": param, "clamp_quantile": clamp_quantile,
               "min_diff": min_diff, "preset": preset}
    metadata = record_history(metadata, "extract", {k: v for k, v in details.items() if v is not None})
    return ExtractResult(tensors, metadata, family, layers)


def _tuned_weight(tuned: Mapping[str, nn.Module], part: str, path: str, like: Tensor) -> Tensor:
    if part not in tuned:
        raise ValueError(f"the fine-tuned model has no {part}")
    try:
        module = naming.innermost_module(tuned[part].get_submodule(path))
    except AttributeError:
        raise ValueError(f"the fine-tuned model has no {part}.{path}: the two models differ in architecture") from None
    weight = getattr(module, "weight", None)
    if weight is None or weight.shape != like.shape:
        shape = None if weight is None else tuple(weight.shape)
        raise ValueError(f"{part}.{path}: base weight {tuple(like.shape)} but fine-tuned {shape}: the models differ in architecture")
    return weight


def _base_metadata(info: BaseModelInfo) -> dict[str, str]:
    return {
        "ss_v2": str(info.family == "sd2"),
        "ss_base_model_version": base_model_version(info),
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": architecture(info),
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if info.family == "sdxl" else "diffusers",
        "modelspec.prediction_type": "v" if info.v_prediction else "epsilon",
        "modelspec.resolution": "1024x1024" if info.family == "sdxl" else "512x512",
    }
