"""Command lines of the adapter tools that need a diffusers base model: `lyco-merge` and `lyco-extract`.

The work is done by the pure functions in lyco.tools (merge.bake_adapters / merge_adapters,
extract.extract_adapter), which take plain nn.Modules; this module only loads pipelines
(pipelines.models.load_pipeline, imported when a model is actually needed), parses arguments and
writes the results (atomically, never over an existing output without --overwrite).

    lyco-merge style.safetensors:0.8 detail.safetensors:0.5 --base builtin:tiny-sd -o merged_model/
    lyco-merge style.safetensors:0.8 detail.safetensors:0.5 --base model.safetensors -o merged.safetensors
    lyco-merge a.safetensors b.safetensors:0.5 --mode concat -o ab.safetensors
    lyco-merge a.safetensors loha.safetensors:0.7 --mode svd --rank 32 --conv-rank 16 -o ab32.safetensors
    lyco-extract --base base.safetensors --tuned tuned.safetensors --rank 32 --conv-rank 16 -o diff.safetensors
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import torch

from lyco.format.container import AdapterFileError, serialize, write_atomic
from lyco.format.save import SAVE_DTYPES, resolve_dtype
from lyco.naming import FAMILIES, UNetLayout
from lyco.tools._common import HISTORY_KEY, cast_tensors, write_adapter
from lyco.tools.checkpoint import single_file_state_dict
from lyco.tools.svd import DYNAMIC_METHODS

from .adapter_arg import split_adapter_arg

MERGE_MODES = ("bake", "concat", "svd")
_PARTS = ("unet", "text_encoder", "text_encoder_2")


# ----- shared --------------------------------------------------------------------------------------


def parse_adapter_arg(text: str) -> tuple[str, Any]:
    """`path`, `path:strength` or `path:unet_strength:text_encoder_strength`."""
    path, numbers = split_adapter_arg(text)
    if not numbers:
        return path, 1.0
    if len(numbers) == 1:
        return path, numbers[0]
    return path, {"unet": numbers[0], "text_encoder": numbers[1], "text_encoder_2": numbers[1]}


def pipeline_parts(pipe: Any) -> dict[str, torch.nn.Module]:
    return {name: getattr(pipe, name) for name in _PARTS if getattr(pipe, name, None) is not None}


def _load(model: str, *, device: str, config_dir: str | None, dtype: torch.dtype = torch.float32):
    """(pipeline, ModelInfo); a model that cannot be loaded raises ValueError with pipelines' message."""
    from pipelines.models import ModelLoadError, describe_pipeline, load_pipeline

    try:
        pipe = load_pipeline(model, dtype=dtype, device=device, config_dir=config_dir)
    except ModelLoadError as err:
        raise ValueError(str(err)) from None
    return pipe, describe_pipeline(pipe)


def _check_output(path: str, overwrite: bool) -> None:
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name or pass --overwrite")


def _add_rank_arguments(parser: argparse.ArgumentParser, default_rank: int | None) -> None:
    parser.add_argument("--rank", type=int, default=default_rank, help="rank (the maximum rank with --dynamic-method)")
    parser.add_argument("--conv-rank", type=int, default=None, help="rank of k x k conv layers (default: --rank)")
    parser.add_argument("--dynamic-method", choices=DYNAMIC_METHODS, default=None,
                        help="per-layer rank: sv_ratio (keep s >= s_max/param), sv_fro (Frobenius fraction >= param), "
                        "sv_cumulative (cumulative sum(s) fraction >= param)")
    parser.add_argument("--dynamic-param", type=float, default=None, help="the dynamic method's parameter")


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", required=True, help="output file or folder")
    parser.add_argument("--precision", choices=sorted(SAVE_DTYPES), default=None, help="save precision (default: fp32)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--config-dir", default=None,
                        help="diffusers folder (or builtin:NAME) with the configs of single-file checkpoints, when offline")
    parser.add_argument("--family", choices=FAMILIES, default=None, help="model family (default: detected)")
    parser.add_argument("--verbose", action="store_true", help="print one line per layer")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--overwrite", action="store_true", help="replace the output if it exists")


def _fail(prog: str, err: Exception) -> int:
    print(f"{prog}: error: {err}", file=sys.stderr)
    return 1


# ----- lyco-merge ----------------------------------------------------------------------------------


def build_merge_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lyco-merge",
        description="Bake adapters (any algorithm mix, with strengths) into a base model and save it as a diffusers "
        "folder or a single-file .safetensors checkpoint (--mode bake, the default with --base), or merge adapters into "
        "one: --mode concat (plain LoRA, exact) or --mode svd (any algorithm, cut to --rank).",
    )
    parser.add_argument("adapters", nargs="+", metavar="ADAPTER[:STRENGTH[:TE_STRENGTH]]",
                        help="adapter file, optionally with a strength, or UNet and text-encoder strengths")
    parser.add_argument("--base", default=None, help="base model: diffusers folder, single-file checkpoint or builtin:NAME")
    parser.add_argument("--mode", choices=MERGE_MODES, default=None, help="bake (default with --base) | concat (default without) | svd")
    _add_rank_arguments(parser, None)
    parser.add_argument("--block-weights", default=None,
                        help="per-block weights: 17/26 (SD1/SD2) or 12/20 (SDXL) comma-separated values in the LoRA Block "
                        "Weight order, or BLOCK=weight pairs such as 'BASE=0,IN04=0.5'")
    parser.add_argument("--allow-pickle", action="store_true", help="accept .ckpt/.pt adapters (read weights-only)")
    parser.add_argument("--non-strict", action="store_true", help="bake: skip adapter modules that do not fit the model")
    _add_common_arguments(parser)
    return parser


def merge_main(argv: Sequence[str] | None = None) -> int:
    args = build_merge_parser().parse_args(argv)
    mode = args.mode or ("bake" if args.base else "concat")
    adapters = [parse_adapter_arg(a) for a in args.adapters]
    try:
        _check_output(args.output, args.overwrite)
        if mode == "bake":
            return _bake(args, adapters)
        return _merge(args, adapters, mode)
    except (AdapterFileError, FileExistsError, ValueError) as err:
        return _fail("lyco-merge", err)


def _bake(args: argparse.Namespace, adapters: list[tuple[str, Any]]) -> int:
    from lyco.tools.merge import bake_adapters

    if not args.base:
        raise ValueError("--mode bake needs --base MODEL")
    dtype = resolve_dtype(args.precision)
    # each layer is baked in float32 and cast once; loading at the save precision halves the memory
    pipe, info = _load(args.base, device=args.device, config_dir=args.config_dir, dtype=dtype or torch.float32)
    family = args.family or info.family
    parts = pipeline_parts(pipe)
    report = bake_adapters(parts, adapters, family=family, block_weights=args.block_weights, strict=not args.non_strict,
                           allow_pickle=args.allow_pickle, show_progress=not args.no_progress)
    for (path, _), count, skipped in zip(adapters, report.modules_per_adapter, report.skipped_keys):
        print(f"{path}: {count} modules baked" + (f", {len(skipped)} keys skipped" if skipped else ""))
    record = {
        "tool": "merge", "mode": "bake", "date": datetime.now().replace(microsecond=0).isoformat(),
        "base": str(args.base), "adapters": [Path(p).name for p, _ in adapters],
        "strengths": [s if isinstance(s, float) else dict(s) for _, s in adapters], "block_weights": args.block_weights,
        "layers_changed": report.layers_changed,
    }
    if args.output.endswith(".safetensors"):
        save_single_file(pipe, args.output, family=family, dtype=dtype, record=record, overwrite=args.overwrite,
                         prediction_type=info.prediction_type)
    else:
        save_folder(pipe, args.output, dtype=dtype, record=record, overwrite=args.overwrite)
    print(f"wrote {args.output} ({report.layers_changed} layers changed)")
    return 0


def save_single_file(pipe: Any, path: str, *, family: str, dtype: torch.dtype | None, record: dict, overwrite: bool,
                     prediction_type: str = "epsilon") -> Path:
    """The pipeline's UNet, VAE and text encoders as one original-layout checkpoint (atomic write)."""
    components = {name: getattr(pipe, name).state_dict() for name in ("unet", "vae", *_PARTS[1:]) if getattr(pipe, name, None) is not None}
    tensors = single_file_state_dict(components, family=family, layout=UNetLayout.from_unet(pipe.unet))
    tensors = cast_tensors({k: v.detach().cpu() for k, v in tensors.items()}, dtype)
    metadata = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base"}[family],
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if family == "sdxl" else "diffusers",
        "modelspec.title": Path(path).stem,
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
        "modelspec.date": record["date"],
        HISTORY_KEY: json.dumps([record]),
    }
    return write_atomic(path, serialize(tensors, metadata), overwrite=overwrite)


def save_folder(pipe: Any, path: str, *, dtype: torch.dtype | None, record: dict, overwrite: bool) -> Path:
    """`save_pretrained` into a temporary sibling folder, then renamed into place (an existing folder
    is replaced only with overwrite, and only after the new one is complete)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        if dtype is not None:
            pipe.to(dtype=dtype)
        pipe.save_pretrained(str(staging), safe_serialization=True)
        (staging / "lyco_history.json").write_text(json.dumps([record], indent=2) + "\n", encoding="utf-8")
        if target.exists():
            if not overwrite:
                raise FileExistsError(f"{target} already exists; choose another name or pass --overwrite")
            old = target.with_name(f".{target.name}.old")
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _merge(args: argparse.Namespace, adapters: list[tuple[str, Any]], mode: str) -> int:
    from lyco.tools.merge import merge_adapters

    if not args.output.endswith(".safetensors"):
        raise ValueError("a merged adapter is written as a .safetensors file")
    base = None
    if args.base:
        pipe, info = _load(args.base, device=args.device, config_dir=args.config_dir)
        base = pipeline_parts(pipe)
    result = merge_adapters(
        adapters, mode=mode, rank=args.rank, conv_rank=args.conv_rank, method=args.dynamic_method, param=args.dynamic_param,
        block_weights=args.block_weights, family=args.family, base=base, device=args.device,
        allow_pickle=args.allow_pickle, show_progress=not args.no_progress,
    )
    metadata = dict(result.metadata, **{"ss_output_name": Path(args.output).stem, "modelspec.title": Path(args.output).stem})
    write_adapter(args.output, cast_tensors(result.tensors, resolve_dtype(args.precision)), metadata, overwrite=args.overwrite)
    if args.verbose:
        for layer in result.layers:
            print(f"{layer.key:<72} {layer.sources} inputs  rank {layer.rank:<4} fro {layer.fro_retained:7.2%}")
    print(f"wrote {args.output}: {len(result.layers)} modules ({mode}, family {result.family})")
    return 0


# ----- lyco-extract --------------------------------------------------------------------------------


def build_extract_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lyco-extract",
        description="Extract a LoRA/LoCon from a base and a fine-tuned model by SVD of their weight difference, "
        "with a fixed or per-layer (dynamic) rank; prints the share of each layer's difference that is kept.",
    )
    parser.add_argument("--base", required=True, help="original model (diffusers folder, single file, builtin:NAME)")
    parser.add_argument("--tuned", required=True, help="fine-tuned model of the same architecture")
    _add_rank_arguments(parser, 4)
    parser.add_argument("--clamp-quantile", type=float, default=None,
                        help="clip factor outliers to this quantile of their absolute values (sd-scripts uses 0.99; default: off, exact)")
    parser.add_argument("--min-diff", type=float, default=0.0,
                        help="skip layers whose largest |difference| is at most this (default 0: skip only unchanged layers)")
    parser.add_argument("--preset", default="attn-mlp",
                        help="which layers: attn-mlp (sd-scripts' LoRA layers; with --conv-rank also ResNet convs), full, ...")
    _add_common_arguments(parser)
    return parser


def extract_main(argv: Sequence[str] | None = None) -> int:
    from lyco.tools.extract import extract_adapter

    args = build_extract_parser().parse_args(argv)
    try:
        _check_output(args.output, args.overwrite)
        if not args.output.endswith(".safetensors"):
            raise ValueError("the extracted adapter is written as a .safetensors file")
        base_pipe, info = _load(args.base, device=args.device, config_dir=args.config_dir)
        tuned_pipe, _ = _load(args.tuned, device=args.device, config_dir=args.config_dir)
        result = extract_adapter(
            pipeline_parts(base_pipe), pipeline_parts(tuned_pipe), rank=args.rank, conv_rank=args.conv_rank,
            method=args.dynamic_method, param=args.dynamic_param, clamp_quantile=args.clamp_quantile, min_diff=args.min_diff,
            preset=args.preset, family=args.family or info.family, v_prediction=info.prediction_type == "v_prediction",
            device=args.device, show_progress=not args.no_progress,
        )
        title = Path(args.output).stem
        metadata = dict(result.metadata, **{"ss_output_name": title, "modelspec.title": title,
                                            "ss_sd_model_name": Path(str(args.base)).name})
        write_adapter(args.output, cast_tensors(result.tensors, resolve_dtype(args.precision)), metadata, overwrite=args.overwrite)
    except (AdapterFileError, FileExistsError, ValueError) as err:
        return _fail("lyco-extract", err)
    if args.verbose:
        for layer in result.layers:
            print(layer.line())
    print(result.summary())
    print(f"wrote {args.output}")
    return 0
