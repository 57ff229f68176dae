"""Resize an adapter's rank by SVD (sd-scripts `networks/resize_lora.py`), and the `lyco-resize` command.

Every module becomes a LoRA/LoCon: plain LoRA modules are re-factorised exactly from their factors
(QR + SVD of the r x r core, never forming ΔW), every other algorithm (LoHa, LoKr, Tucker LoCon)
through its ΔW. The effective scale is kept as sd-scripts does: the SVD is of the unscaled ΔW and the
new alpha is old_scale · new_rank (old_scale = alpha/rank, 1 without alpha or for LoKr with two full
factors). A module's `dora_scale` is kept as it is: the resized low-rank part is its new direction.
Each module reports the Frobenius (and sum) fraction of ΔW its new rank keeps.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from .. import naming
from ..algos import get_algorithm
from ..format import detect
from ..format.adapter_file import AdapterFile, ModuleEntry, load_adapter_file
from ..format.container import AdapterFileError
from ..network import detect_family
from ._common import (
    SAVE_DTYPES, cast_tensors, infer_weight_shape, is_spatial, lora_factors, lora_network_metadata, progress,
    record_history, resolve_dtype, spec_for_shape, write_adapter,
)
from .svd import DYNAMIC_METHODS, LowRank, RankRule, as_matrix, factored_svd, lora_tensors, truncated_svd


@dataclass(frozen=True)
class LayerReport:
    key: str
    algo: str
    old_rank: int | None
    new_rank: int
    alpha: float
    fro_retained: float
    sum_retained: float
    shape: tuple[int, ...]

    def line(self) -> str:
        return (f"{self.key:<72} {self.algo:>4} {str(self.old_rank):>5} -> {self.new_rank:<4} "
                f"alpha {self.alpha:<8g} fro {self.fro_retained:7.2%}  sum(S) {self.sum_retained:7.2%}")


@dataclass
class ResizeResult:
    tensors: dict[str, Tensor]
    metadata: dict[str, str]
    layers: list[LayerReport] = field(default_factory=list)

    def summary(self) -> str:
        fro = [r.fro_retained for r in self.layers]
        mean = sum(fro) / len(fro)
        std = (sum((f - mean) ** 2 for f in fro) / len(fro)) ** 0.5
        return f"{len(self.layers)} modules; Frobenius norm retained: mean {mean:.2%}, std {std:.3f}, min {min(fro):.2%}"


def resize_adapter(
    adapter: AdapterFile | str | os.PathLike,
    *,
    rank: int | None = None,
    conv_rank: int | None = None,
    method: str | None = None,
    param: float | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    device: str | torch.device | None = None,
    show_progress: bool = False,
) -> ResizeResult:
    """Every module of `adapter` as a LoRA/LoCon of the chosen rank.

    rank: the fixed rank, or the maximum with a dynamic `method` ("sv_ratio", "sv_fro",
    "sv_cumulative", see lyco.tools.svd) and its `param`; conv_rank: the same for k x k convs
    (default: rank). shapes: optional {module key: layer weight shape} (`model_layer_shapes(parts)`) for
    files whose flattened LoHa/LoKr factors do not fix the layer shape (see `infer_weight_shape`)."""
    if not isinstance(adapter, AdapterFile):
        adapter = load_adapter_file(adapter)
    if rank is None and method is None:
        raise ValueError("pass a rank, or a dynamic method with its parameter")
    rule = RankRule(rank, method, param)
    conv_rule = RankRule(conv_rank if conv_rank is not None else rank, method, param)
    pointwise_proj = _is_sd1(adapter)
    tensors: dict[str, Tensor] = {}
    layers: list[LayerReport] = []
    items = list(adapter.modules.values())
    for entry in progress(items, total=len(items), desc="resize", enabled=show_progress):
        shape = tuple(shapes[entry.key]) if shapes and entry.key in shapes else infer_weight_shape(entry, pointwise_proj=pointwise_proj)
        low = resize_module(entry, shape, conv_rule if is_spatial(shape) else rule, device=device)
        alpha = entry.scale * low.rank
        tensors.update({f"{entry.key}.{k}": v for k, v in lora_tensors(low, shape).items()})
        tensors[f"{entry.key}.alpha"] = torch.tensor(float(alpha))
        if entry.dora_scale is not None:
            tensors[f"{entry.key}.dora_scale"] = entry.dora_scale.clone()
        layers.append(LayerReport(entry.key, entry.algo, entry.rank, low.rank, alpha, low.fro_retained, low.sum_retained, shape))
    metadata = lora_network_metadata(adapter.metadata, tensors, dynamic=method is not None)
    details = {"rank": rank, "conv_rank": conv_rank, "method": method, "param": param}
    metadata = record_history(metadata, "resize", {k: v for k, v in details.items() if v is not None})
    old = sorted({r.old_rank for r in layers if r.old_rank is not None})
    comment = f"rank resized from {old} with {rule.describe()}" + (f" (conv {conv_rule.describe()})" if conv_rank is not None else "")
    previous = adapter.metadata.get("ss_training_comment", "")
    metadata["ss_training_comment"] = f"{comment}; {previous}" if previous and previous != "None" else comment
    return ResizeResult(tensors, metadata, layers)


def model_layer_shapes(parts: Mapping[str, nn.Module], *, family: str | None = None) -> dict[str, tuple[int, ...]]:
    """{module key (every key form a file may use): layer weight shape} of a model, for `shapes=`."""
    table = naming.build_key_table(parts, family=family or detect_family(parts))
    shapes: dict[str, tuple[int, ...]] = {}
    for alias, (part, path) in table.by_key.items():
        shapes[alias] = tuple(naming.innermost_module(parts[part].get_submodule(path)).weight.shape)
    return shapes


def resize_module(entry: ModuleEntry, shape: Sequence[int], rule: RankRule, *, device: str | torch.device | None = None) -> LowRank:
    """The truncated SVD of one module's unscaled ΔW (exact from the factors for plain LoRA)."""
    factors = lora_factors(entry)
    if factors is not None:
        return factored_svd(*factors, rule, device=device)
    spec = spec_for_shape(shape)
    params = {k: v.to(device=device, dtype=torch.float32) for k, v in entry.tensors.items()}
    delta = get_algorithm(entry.algo).delta_weight(params, spec)
    return truncated_svd(as_matrix(delta), rule, device=device)


def _is_sd1(adapter: AdapterFile) -> bool:
    shapes = {f"{k}.{s}": tuple(t.shape) for k, e in adapter.modules.items() for s, t in e.tensors.items()}
    return detect.detect_family_from_shapes(shapes) == "sd1"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lyco-resize",
        description="Change the rank of a LoRA/LoCon by SVD, or convert any algorithm (LoHa, LoKr) to a LoRA of a "
        "given rank, keeping the effective scale. Prints the Frobenius norm each module keeps.",
    )
    parser.add_argument("source", help="adapter .safetensors file")
    parser.add_argument("destination", help="output .safetensors file")
    parser.add_argument("--rank", type=int, default=None, help="new rank (the maximum rank with --dynamic-method)")
    parser.add_argument("--conv-rank", type=int, default=None, help="new rank of k x k conv modules (default: --rank)")
    parser.add_argument("--dynamic-method", choices=DYNAMIC_METHODS, default=None,
                        help="per-module rank: sv_ratio (keep s >= s_max/param), sv_fro (keep Frobenius fraction >= param), "
                        "sv_cumulative (keep cumulative sum(s) fraction >= param)")
    parser.add_argument("--dynamic-param", type=float, default=None, help="the dynamic method's parameter")
    parser.add_argument("--precision", choices=sorted(SAVE_DTYPES), default=None, help="save precision (default: fp32)")
    parser.add_argument("--device", default=None, help="device for the SVDs, e.g. cuda (default: cpu)")
    parser.add_argument("--verbose", action="store_true", help="print one line per module")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true", help="replace the destination if it exists")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rank is None and args.dynamic_method is None:
        print("lyco-resize: error: pass --rank, or --dynamic-method with --dynamic-param", file=sys.stderr)
        return 2
    try:
        if os.path.exists(args.destination) and not args.overwrite:
            raise FileExistsError(f"{args.destination} already exists; pass --overwrite to replace it")
        result = resize_adapter(
            args.source, rank=args.rank, conv_rank=args.conv_rank, method=args.dynamic_method, param=args.dynamic_param,
            device=args.device, show_progress=not args.no_progress,
        )
        tensors = cast_tensors(result.tensors, resolve_dtype(args.precision))
        write_adapter(args.destination, tensors, result.metadata, overwrite=args.overwrite)
    except (AdapterFileError, FileExistsError, ValueError) as err:
        print(f"lyco-resize: error: {err}", file=sys.stderr)
        return 1
    if args.verbose:
        for layer in result.layers:
            print(layer.line())
    print(result.summary())
    print(f"wrote {args.destination}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
