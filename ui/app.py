"""lyco-ui: a local Gradio app to train adapters and generate with stacks of them.

    lyco-ui [--host 127.0.0.1] [--port 7860] [--auth user:pass] [--workdir DIR] [--adapter-dir DIR]
            [--data-dir DIR] [--model-dir DIR ...]

Served on 127.0.0.1 unless --host says otherwise. Only the work, adapter, data and model folders are
readable through the UI. Training runs as a `lyco-train` child process (one at a time); generation and
the tools run in queued events with concurrency limits, so a long job never blocks other requests.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .jobs import TrainingJob
from .paths import PathPolicy
from .state import GenerationEngine, UIContext

CSS = """
#train-status p, #train-progress p { margin: 0.2em 0; }
#train-log textarea { font-family: ui-monospace, monospace; font-size: 12px; }
#tools-inspect-report textarea, .tools-log textarea { font-family: ui-monospace, monospace; font-size: 12px; }
"""


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 7860
    auth: tuple[str, str] | None = None
    workdir: Path = Path("lyco-work")
    adapter_dir: Path | None = None  # default <workdir>/adapters
    data_dir: Path | None = None  # default <workdir>/data
    model_dirs: tuple[Path, ...] = ()
    refresh_s: float = 1.0  # how often the Train tab polls the training process
    stop_grace_s: float = 60.0  # Stop kills the trainer's tree if it has not exited after this long
    max_queue: int = 64
    python: str = field(default_factory=lambda: sys.executable)


def make_context(settings: Settings) -> UIContext:
    policy = PathPolicy.create(workdir=settings.workdir, adapter_dir=settings.adapter_dir, data_dir=settings.data_dir,
                               model_dirs=settings.model_dirs)
    return UIContext(policy=policy, job=TrainingJob(grace_s=settings.stop_grace_s), engine=GenerationEngine(policy),
                     python=settings.python, refresh_s=settings.refresh_s)


def build_app(settings: Settings, *, context: UIContext | None = None) -> Any:
    """The whole app (not launched). `context` lets tests share the job and engine."""
    import gradio as gr

    from . import generate_tab, tools_tab, train_tab

    ctx = context or make_context(settings)
    with gr.Blocks(title="lyco", analytics_enabled=False) as app:
        gr.Markdown(f"## lyco · LoRA / LoHa / LoKr for Stable Diffusion\nFolders: work `{ctx.policy.work}` · adapters "
                    f"`{ctx.policy.adapters}` · data `{ctx.policy.data}`", elem_id="app-header")
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                train_tab.build(ctx)
            with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
                generate_tab.build(ctx)
            with gr.Tab("Tools", id="tools", elem_id="tab-tools"):
                tools_tab.build(ctx)
    app.queue(max_size=settings.max_queue, default_concurrency_limit=1)
    app.lyco_context = ctx  # for tests and main()
    return app


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError("--auth: expected user:password")
    return user, password


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lyco-ui", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--auth", type=parse_auth, default=None, metavar="USER:PASS", help="require this login")
    parser.add_argument("--workdir", type=Path, default=Path("lyco-work"), help="configs, runs, generated images (default ./lyco-work)")
    parser.add_argument("--adapter-dir", type=Path, default=None, help="adapter files (default <workdir>/adapters)")
    parser.add_argument("--data-dir", type=Path, default=None, help="datasets (default <workdir>/data)")
    parser.add_argument("--model-dir", type=Path, action="append", default=[], help="folder of base models (read-only); repeatable")
    parser.add_argument("--stop-grace", type=float, default=60.0, help="seconds Stop waits for the trainer's state before killing it")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local tool: no usage reporting
    settings = Settings(host=args.host, port=args.port, auth=args.auth, workdir=args.workdir, adapter_dir=args.adapter_dir,
                        data_dir=args.data_dir, model_dirs=tuple(args.model_dir), stop_grace_s=args.stop_grace)
    app = build_app(settings)
    ctx: UIContext = app.lyco_context
    import gradio as gr

    try:
        app.launch(server_name=settings.host, server_port=settings.port, auth=settings.auth, allowed_paths=[str(p) for p in ctx.policy.readable()],
                   show_error=True, theme=gr.themes.Soft(), css=CSS)
    except KeyboardInterrupt:
        pass
    finally:
        ctx.job.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
