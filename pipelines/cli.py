"""lyco-generate: images from a base model with any mix of LoRA/LoCon/LoHa/LoKr adapters.

    lyco-generate --prompt "a red circle <lora:ink:0.6>" --adapter-dir loras/ \\
        --adapter style.safetensors:0.8:0.5 --seed 1..4 --batch 2 --out out/

Writes ``OUT/NNNNN-SEED.png`` per image (A1111 ``parameters`` text chunk) and ``OUT/grid.png`` when
there is more than one image. Existing files are never replaced without ``--overwrite``; all target
names are checked before anything is generated.
"""
from __future__ import annotations

import argparse
import re
import secrets
import sys
from pathlib import Path
from typing import Sequence

import torch

from .adapter_arg import split_adapter_arg

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_SEED_RANGE = re.compile(r"^\s*(-?\d+)\s*\.\.\s*(-?\d+)\s*$")
MAX_SEED = 2**32 - 1


class CliError(ValueError):
    """A command-line value that cannot be used; printed as `lyco-generate: error: ...`."""


def parse_seeds(values: Sequence[str] | None, *, batch: int) -> tuple[int, ...]:
    """`--seed` values (N or N..M inclusive, repeatable); none -> a random seed; one seed with
    --batch B -> B consecutive seeds (as A1111 does)."""
    seeds: list[int] = []
    for value in values or []:
        match = _SEED_RANGE.match(value)
        try:
            items = range(int(match.group(1)), int(match.group(2)) + 1) if match else [int(value)]
        except ValueError:
            raise CliError(f"--seed {value!r}: give an integer or a range N..M") from None
        if match and int(match.group(2)) < int(match.group(1)):
            raise CliError(f"--seed {value!r}: the range end is below its start")
        seeds.extend(items)
    if not seeds:
        seeds = [secrets.randbelow(MAX_SEED)]
    for seed in seeds:
        if not 0 <= seed <= MAX_SEED:
            raise CliError(f"--seed {seed} is outside 0..{MAX_SEED}")
    if len(seeds) == 1 and batch > 1:
        seeds = [seeds[0] + i for i in range(batch)]
    return tuple(seeds)


def parse_adapter_arg(value: str) -> tuple[Path, float, float | None]:
    """`PATH[:STRENGTH[:TE_STRENGTH]]` -> (path, strength, te strength or None)."""
    text, numbers = split_adapter_arg(value)
    path = Path(text)
    if not path.is_file():
        raise CliError(f"--adapter {value!r}: {path} is not a file; give PATH[:STRENGTH[:TE_STRENGTH]]")
    strength = numbers[0] if numbers else 1.0
    return path, strength, numbers[1] if len(numbers) > 1 else None


def build_parser() -> argparse.ArgumentParser:
    from .generate import SCHEDULERS

    parser = argparse.ArgumentParser(prog="lyco-generate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:tiny-sd", help="diffusers folder, single-file checkpoint, hub id or builtin:tiny-sd|tiny-sd2|tiny-sdxl")
    parser.add_argument("--config-dir", help="for single-file checkpoints: a local diffusers folder of the same architecture")
    parser.add_argument("--prompt", required=True, help="prompt; <lora:name:w>, <lora:name:te:unet>, te=, unet=, lbw= tags are applied")
    parser.add_argument("--negative", default="", help="negative prompt")
    parser.add_argument("--seed", action="append", help="seed or range N..M (inclusive); repeatable; default: random")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.0, help="classifier-free guidance scale (A1111 'CFG scale')")
    parser.add_argument("--width", type=int, help="default: the model's native size")
    parser.add_argument("--height", type=int)
    parser.add_argument("--scheduler", choices=list(SCHEDULERS), help="default: the model's own scheduler")
    parser.add_argument("--batch", type=int, default=1, help="images per pipeline call (one seed + --batch B gives B seeds)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--adapter", action="append", default=[], metavar="PATH[:STRENGTH[:TE_STRENGTH]]",
                        help="adapter file; STRENGTH applies to the UNet (and the text encoders unless TE_STRENGTH is given); repeatable")
    parser.add_argument("--adapter-dir", help="folder whose adapter files prompt tags name (file name without .safetensors)")
    parser.add_argument("--fuse", action="store_true", help="bake the adapters into the weights (base-speed generation)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing PNGs in --out")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--no-grid", action="store_true", help="do not write grid.png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--non-strict", action="store_true", help="load the modules of an adapter that fit the model and skip the rest")
    return parser


def _output_paths(out: Path, seeds: Sequence[int], *, grid: bool, overwrite: bool) -> tuple[list[Path], Path | None]:
    paths = [out / f"{index:05d}-{seed}.png" for index, seed in enumerate(seeds)]
    grid_path = out / "grid.png" if grid and len(seeds) > 1 else None
    existing = [p for p in [*paths, grid_path] if p is not None and p.exists()]
    if existing and not overwrite:
        shown = ", ".join(str(p) for p in existing[:5]) + (" ..." if len(existing) > 5 else "")
        raise CliError(f"{len(existing)} output files already exist ({shown}); pass --overwrite or choose another --out")
    return paths, grid_path


def run(args: argparse.Namespace) -> list[Path]:
    from tqdm import tqdm

    from .generate import GenerationSettings, generate, model_display_name, model_short_hash
    from .models import load_pipeline
    from .png_info import format_parameters, make_grid, save_png
    from .prompt_tags import AdapterLibrary
    from .stack import AdapterStack

    if args.batch < 1 or args.steps < 1:
        raise CliError("--batch and --steps must be >= 1")
    seeds = parse_seeds(args.seed, batch=args.batch)
    adapters = [parse_adapter_arg(value) for value in args.adapter]
    names = [path.stem for path, _, _ in adapters]
    if len(set(names)) != len(names):
        raise CliError(f"two --adapter files have the same name ({', '.join(names)}); adapters are named by file name, rename one")
    library = AdapterLibrary(args.adapter_dir) if args.adapter_dir else None
    out = Path(args.out)
    paths, grid_path = _output_paths(out, seeds, grid=not args.no_grid, overwrite=args.overwrite)
    pipe = load_pipeline(args.model, dtype=DTYPES[args.dtype], device=args.device, config_dir=args.config_dir)
    stack = AdapterStack(pipe)
    for name, (path, strength, te_strength) in zip(names, adapters):
        stack.add(name, path, unet=strength, text_encoder=strength if te_strength is None else te_strength, strict=not args.non_strict)
    if args.fuse:
        stack.fuse()
    settings = GenerationSettings(
        prompt=args.prompt, negative_prompt=args.negative, seeds=seeds, steps=args.steps, guidance_scale=args.guidance,
        width=args.width, height=args.height, scheduler=args.scheduler, batch_size=args.batch,
    )
    with tqdm(total=len(seeds) * args.steps, desc="lyco-generate", unit="step", disable=args.no_progress) as bar:
        result = generate(pipe, settings, stack=stack, library=library, model_name=model_display_name(args.model),
                          model_hash=model_short_hash(args.model), progress=bar.update)
    written = [save_png(image, path, parameters=format_parameters(params), overwrite=args.overwrite)
               for image, params, path in zip(result.images, result.parameters, paths)]
    if grid_path is not None:
        written.append(save_png(make_grid(result.images), grid_path, parameters=format_parameters(result.parameters[0]), overwrite=args.overwrite))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .models import ModelLoadError

    try:
        written = run(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, ModelLoadError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"lyco-generate: error: {message}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
