"""lyco-train: train a LoRA / LoHa / LoKr adapter from one TOML config.

    lyco-train --config style.toml [--set section.key=value ...] [--print-config] [--resume [STATE_DIR]]

Runs unchanged under `accelerate launch` / `torchrun`. Exit codes: 0 done, 2 invalid config,
1 failed, 128 + signal number after SIGINT/SIGTERM (a resumable state and an adapter were saved).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from .config_io import ConfigError, dump_toml, load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lyco-train", description=__doc__.split("\n\n")[0],
                                     epilog="Every key is documented in docs/config-reference.md.")
    parser.add_argument("--config", required=True, help="the TOML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (TOML syntax: 10, 1e-4, true, \"text\", [1, 2]; a bare word is a string); repeatable")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="STATE_DIR",
                        help="continue from STATE_DIR, or without a value from the newest state in <output_dir>/state")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    try:
        config = load_config(args.config, args.overrides, check_paths=not args.print_config)
    except ConfigError as err:
        print(f"lyco-train: invalid configuration\n{err}", file=sys.stderr)
        return 2
    if args.print_config:
        sys.stdout.write(dump_toml(config))
        return 0
    from .outputs import final_adapter_path, latest_state

    final = final_adapter_path(config)
    if args.resume is None and final.exists() and not config.saving.overwrite:
        print(f"lyco-train: invalid configuration\n{args.config}: 1 problem(s):\n  saving.output_name: {final} already exists; "
              "choose another output_name/output_dir, set saving.overwrite = true, or --resume", file=sys.stderr)
        return 2
    if args.resume is True and latest_state(config.saving.output_dir) is None:
        print(f"lyco-train: --resume: no saved state under {config.saving.output_dir}/state", file=sys.stderr)
        return 2
    if isinstance(args.resume, str) and not (Path(args.resume) / "lyco_state.json").is_file():
        print(f"lyco-train: --resume {args.resume}: not a complete lyco-train state folder (no lyco_state.json)", file=sys.stderr)
        return 2
    from .loop import TrainingInterrupted, train

    try:
        result = train(config, resume=args.resume)
    except TrainingInterrupted as stop:
        print(f"lyco-train: {stop}. Continue with: lyco-train --config {args.config} --resume {stop.state_dir}", file=sys.stderr)
        return 128 + stop.signum
    if result.adapter is not None:
        print(f"saved {result.adapter} after {result.steps} steps (last loss {result.last_loss:.4f})" if result.last_loss is not None
              else f"saved {result.adapter}")
    return 0


def _quiet_libraries() -> None:
    import os
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("diffusers", "transformers", "accelerate", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*torchvision.*")


if __name__ == "__main__":
    raise SystemExit(main())
