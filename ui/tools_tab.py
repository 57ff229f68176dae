"""Tools tab: inspect an adapter (lyco-inspect, in-process: it reads one file), and the adapter tools
lyco-merge / lyco-resize / lyco-extract / lyco-convert, each run as its own child process with the
same arguments as on the command line (the command and its output are shown). Inputs come from the
UI's folders; outputs are plain file names written into the adapter folder (baked models into
`<work>/models`), never over an existing file.
"""
from __future__ import annotations

import shlex
import subprocess
import sys
from typing import Any, Sequence

from .paths import PathNotAllowed, PathPolicy
from .state import UIContext

TOOLS = {
    "merge": ("lyco-merge", "pipelines.tools_cli", "merge_main"),
    "extract": ("lyco-extract", "pipelines.tools_cli", "extract_main"),
    "resize": ("lyco-resize", "lyco.tools.resize", "main"),
    "convert": ("lyco-convert", "lyco.tools.convert", "main"),
}
TOOL_TIMEOUT_S = 6 * 3600


# ----- inspect ------------------------------------------------------------------------------------------
def inspect_choice(policy: PathPolicy, choice: str) -> tuple[str, dict]:
    """(lyco-inspect's report, its data) for an adapter in the UI's folders."""
    from lyco.format.container import AdapterFileError
    from lyco.tools.inspect import format_report, inspect_adapter

    if not choice:
        return "Pick an adapter file.", {}
    try:
        path = policy.resolve(choice, base="adapters", what="adapter", must_exist=True, kind="file")
        info = inspect_adapter(path)
    except (PathNotAllowed, AdapterFileError, OSError) as err:
        return f"lyco-inspect: error: {err}", {}
    return format_report(info), info


# ----- the command-line tools ------------------------------------------------------------------------------
def _adapter(policy: PathPolicy, text: str, what: str) -> str:
    return str(policy.resolve(text, base="adapters", what=what, must_exist=True, kind="file"))


def resize_args(policy: PathPolicy, *, source: str, output: str, rank: int | None = None, dynamic_method: str | None = None,
                dynamic_param: float | None = None, precision: str | None = None) -> list[str]:
    args = [_adapter(policy, source, "source adapter"), str(policy.output_file(output)), "--no-progress"]
    if rank:
        args += ["--rank", str(int(rank))]
    if dynamic_method:
        args += ["--dynamic-method", dynamic_method, "--dynamic-param", str(float(dynamic_param or 0))]
    if precision:
        args += ["--precision", precision]
    return args


def convert_args(policy: PathPolicy, *, source: str, output: str, to: str | None = None, precision: str | None = None) -> list[str]:
    args = [_adapter(policy, source, "source adapter"), str(policy.output_file(output))]
    if to:
        args += ["--to", to]
    if precision:
        args += ["--precision", precision]
    return args


def merge_args(policy: PathPolicy, *, sources: Sequence[str], strengths: str = "", output: str, mode: str = "concat",
               rank: int | None = None, base: str = "", precision: str | None = None) -> list[str]:
    """`strengths`: comma-separated numbers, one per source (default 1)."""
    if not sources:
        raise PathNotAllowed("merge: pick at least one adapter")
    numbers = [s.strip() for s in (strengths or "").split(",") if s.strip()]
    if numbers and len(numbers) != len(sources):
        raise ValueError(f"strengths: {len(numbers)} numbers for {len(sources)} adapters; give one per adapter (or none)")
    args = []
    for i, source in enumerate(sources):
        weight = f":{float(numbers[i]):g}" if numbers else ""
        args.append(_adapter(policy, source, f"adapter {i + 1}") + weight)
    if mode == "bake":
        if not base:
            raise ValueError("bake: choose the base model to bake into")
        out = policy.work / "models" / policy.output_file(output, role="work", suffix="", what="output name").name
        args += ["--base", policy.model(base), "--mode", "bake", "-o", str(out)]
    else:
        args += ["--mode", mode, "-o", str(policy.output_file(output))]
        if base:
            args += ["--base", policy.model(base)]
    if rank:
        args += ["--rank", str(int(rank))]
    if precision:
        args += ["--precision", precision]
    return args + ["--no-progress"]


def extract_args(policy: PathPolicy, *, base: str, tuned: str, output: str, rank: int = 4, conv_rank: int | None = None,
                 precision: str | None = None) -> list[str]:
    args = ["--base", policy.model(base), "--tuned", policy.model(tuned), "--rank", str(int(rank)), "-o", str(policy.output_file(output))]
    if conv_rank:
        args += ["--conv-rank", str(int(conv_rank))]
    if precision:
        args += ["--precision", precision]
    return args + ["--no-progress"]


def run_tool(tool: str, args: Sequence[str], *, python: str = "", cwd: str | None = None, timeout: float = TOOL_TIMEOUT_S) -> tuple[bool, str]:
    """Run one tool as a child process; (succeeded, the command line and its output)."""
    name, module, function = TOOLS[tool]
    code = f"import sys; from {module} import {function} as main; sys.exit(main(sys.argv[1:]))"
    shown = shlex.join([name, *args])
    try:
        done = subprocess.run([python or sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                              cwd=cwd, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return False, f"$ {shown}\n(timed out after {timeout:.0f} s)"
    output = (done.stdout + done.stderr).strip()
    verdict = "" if done.returncode == 0 else f"\n(exit {done.returncode})"
    return done.returncode == 0, f"$ {shown}\n{output}{verdict}"


def run_with(ctx: UIContext, tool: str, build_args: Any, **kwargs: Any) -> str:
    try:
        args = build_args(ctx.policy, **kwargs)
    except (PathNotAllowed, ValueError, TypeError) as err:
        return f"{TOOLS[tool][0]}: {err}"
    return run_tool(tool, args, python=ctx.python, cwd=str(ctx.policy.work))[1]


# ----- the tab ------------------------------------------------------------------------------------------
def build(ctx: UIContext) -> None:
    import gradio as gr

    from .generate_tab import list_adapters
    from .train_tab import model_choices

    policy = ctx.policy
    adapters = list_adapters(policy)
    models = model_choices(policy)
    precisions = ["", "fp16", "bf16", "fp32"]
    pickers: list[Any] = []

    def picker(label: str, elem_id: str, multiselect: bool = False) -> Any:
        component = gr.Dropdown(adapters, value=[] if multiselect else None, multiselect=multiselect, allow_custom_value=not multiselect,
                                label=label, elem_id=elem_id)
        pickers.append(component)
        return component

    refresh = gr.Button("Refresh adapter lists", size="sm", elem_id="tools-refresh")
    with gr.Tab("Inspect", elem_id="tools-inspect-tab"):
        inspect_pick = picker(f"Adapter (in {policy.adapters})", "tools-inspect-pick")
        inspect_button = gr.Button("Inspect", variant="primary", elem_id="tools-inspect-run")
        report = gr.Textbox(label="Report", lines=18, interactive=False, elem_id="tools-inspect-report")
        details = gr.JSON(label="Details", elem_id="tools-inspect-json")
    with gr.Tab("Merge", elem_id="tools-merge-tab"):
        merge_sources = picker("Adapters", "tools-merge-sources", multiselect=True)
        with gr.Row():
            merge_strengths = gr.Textbox(label="Strengths (comma-separated, one per adapter)", elem_id="tools-merge-strengths")
            merge_mode = gr.Radio(["concat", "svd", "bake"], value="concat", label="Mode", elem_id="tools-merge-mode",
                                  info="concat: exact LoRA; svd: any algorithms, cut to rank; bake: into a base model")
            merge_rank = gr.Number(0, precision=0, minimum=0, label="Rank (svd)", elem_id="tools-merge-rank")
        with gr.Row():
            merge_base = gr.Dropdown(models, value=None, allow_custom_value=True, label="Base model (bake; optional for svd)", elem_id="tools-merge-base")
            merge_out = gr.Textbox("merged", label="Output name", elem_id="tools-merge-output")
            merge_precision = gr.Dropdown(precisions, value="", label="Precision", elem_id="tools-merge-precision")
        merge_button = gr.Button("Merge", variant="primary", elem_id="tools-merge-run")
        merge_log = gr.Textbox(label="Output", lines=8, interactive=False, elem_id="tools-merge-log")
    with gr.Tab("Resize", elem_id="tools-resize-tab"):
        resize_source = picker("Adapter", "tools-resize-source")
        with gr.Row():
            resize_rank = gr.Number(4, precision=0, minimum=0, label="New rank (max rank with a dynamic method)", elem_id="tools-resize-rank")
            resize_method = gr.Dropdown(["", "sv_ratio", "sv_fro", "sv_cumulative"], value="", label="Dynamic method", elem_id="tools-resize-method")
            resize_param = gr.Number(None, label="Dynamic parameter", elem_id="tools-resize-param")
            resize_out = gr.Textbox("resized", label="Output name", elem_id="tools-resize-output")
            resize_precision = gr.Dropdown(precisions, value="", label="Precision", elem_id="tools-resize-precision")
        resize_button = gr.Button("Resize", variant="primary", elem_id="tools-resize-run")
        resize_log = gr.Textbox(label="Output", lines=8, interactive=False, elem_id="tools-resize-log")
    with gr.Tab("Extract", elem_id="tools-extract-tab"):
        with gr.Row():
            extract_base = gr.Dropdown(models, value=None, allow_custom_value=True, label="Base model", elem_id="tools-extract-base")
            extract_tuned = gr.Dropdown(models, value=None, allow_custom_value=True, label="Fine-tuned model", elem_id="tools-extract-tuned")
        with gr.Row():
            extract_rank = gr.Number(4, precision=0, minimum=1, label="Rank", elem_id="tools-extract-rank")
            extract_conv = gr.Number(0, precision=0, minimum=0, label="Conv rank (0 = none)", elem_id="tools-extract-conv-rank")
            extract_out = gr.Textbox("extracted", label="Output name", elem_id="tools-extract-output")
            extract_precision = gr.Dropdown(precisions, value="", label="Precision", elem_id="tools-extract-precision")
        extract_button = gr.Button("Extract", variant="primary", elem_id="tools-extract-run")
        extract_log = gr.Textbox(label="Output", lines=8, interactive=False, elem_id="tools-extract-log")
    with gr.Tab("Convert", elem_id="tools-convert-tab"):
        with gr.Row():
            convert_source = picker("Adapter", "tools-convert-source")
            convert_to = gr.Dropdown(["", "kohya", "diffusers"], value="", label="Key format (empty = keep)", elem_id="tools-convert-to")
            convert_precision = gr.Dropdown(precisions, value="", label="Precision", elem_id="tools-convert-precision")
            convert_out = gr.Textbox("converted", label="Output name", elem_id="tools-convert-output")
        convert_button = gr.Button("Convert", variant="primary", elem_id="tools-convert-run")
        convert_log = gr.Textbox(label="Output", lines=6, interactive=False, elem_id="tools-convert-log")

    def refreshed():
        choices = list_adapters(policy)
        return [gr.update(choices=choices) for _ in pickers]

    limits = dict(concurrency_id="tools", concurrency_limit=1)
    refresh.click(refreshed, None, pickers, show_progress="hidden")
    inspect_button.click(lambda choice: inspect_choice(policy, choice), inspect_pick, [report, details], concurrency_limit=4)
    merge_button.click(lambda sources, strengths, mode, rank, base, out, precision: run_with(
        ctx, "merge", merge_args, sources=sources or [], strengths=strengths, mode=mode, rank=rank, base=base or "", output=out,
        precision=precision or None), [merge_sources, merge_strengths, merge_mode, merge_rank, merge_base, merge_out, merge_precision],
        merge_log, **limits)
    resize_button.click(lambda source, rank, method, param, out, precision: run_with(
        ctx, "resize", resize_args, source=source or "", rank=rank, dynamic_method=method or None, dynamic_param=param, output=out,
        precision=precision or None), [resize_source, resize_rank, resize_method, resize_param, resize_out, resize_precision], resize_log, **limits)
    extract_button.click(lambda base, tuned, rank, conv, out, precision: run_with(
        ctx, "extract", extract_args, base=base or "", tuned=tuned or "", rank=rank, conv_rank=conv, output=out, precision=precision or None),
        [extract_base, extract_tuned, extract_rank, extract_conv, extract_out, extract_precision], extract_log, **limits)
    convert_button.click(lambda source, to, precision, out: run_with(
        ctx, "convert", convert_args, source=source or "", to=to or None, precision=precision or None, output=out),
        [convert_source, convert_to, convert_precision, convert_out], convert_log, **limits)
