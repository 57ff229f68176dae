"""Train tab: a form over the lyco-train TOML (the mapping lives in train_config), a dataset preview, and
the live view of the child process."""
from __future__ import annotations

import copy
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from .paths import PathNotAllowed, PathPolicy, safe_name
from .state import UIContext
from .train_config import DEFAULT_CONFIG, FIELDS, check_config, config_to_form, form_to_config, load_config_file, save_config_file

LOG_LINES = 60


# ----- dataset preview -------------------------------------------------------------------------------------
def preview_dataset(policy: PathPolicy, data_dir: str, *, model: str = "", resolution: int | None = None,
                    enable_bucket: bool = False, caption_extension: str = ".txt") -> tuple[str, list[tuple[str, str]]]:
    """(markdown: images, caption coverage and buckets per subset; up to 8 thumbnails)."""
    from trainers.buckets import bucket_for, make_buckets, summary
    from trainers.captions import read_caption
    from trainers.config import DatasetSection
    from trainers.data import bucket_settings, resolve_subsets, scan_subset

    try:
        folder = policy.resolve(data_dir, base="data", what="dataset folder", must_exist=True, kind="dir")
    except PathNotAllowed as err:
        return f"**Dataset:** {err}", []
    native = native_resolution(model) if model else None
    side = int(resolution or 0) or native or 512
    section = DatasetSection(train_data_dir=str(folder), enable_bucket=bool(enable_bucket), caption_extension=caption_extension)
    try:
        subsets = resolve_subsets(section)
    except ValueError as err:
        return f"**Dataset:** {err}", []
    settings = bucket_settings(section, (side, side))
    buckets = make_buckets(settings)
    lines = [f"**{folder}** at {side}x{side}" + ("" if resolution or native else " (assumed; the model's native size is unknown)")]
    thumbs: list[tuple[str, str]] = []
    total = 0
    for index, subset in enumerate(subsets):
        warnings: list[str] = []
        items, skipped = scan_subset(index, subset, on_corrupt="skip", warn=warnings.append)
        captioned = sum(1 for item in items if read_caption(item.path, subset.caption_extension) is not None)
        total += len(items)
        coverage = f"{captioned}/{len(items)} captioned" + (f" (others use {subset.class_tokens!r})" if captioned < len(items) and subset.class_tokens else "")
        lines.append(f"- `{subset.image_dir.name}`: {len(items)} images x {subset.num_repeats} repeats, {coverage}"
                     + (f", {len(skipped)} unreadable" if skipped else ""))
        assigned = [bucket_for(item.size, settings, buckets) for item in items]
        lines += [f"  - {line}" for line in summary(assigned, [subset.num_repeats] * len(items))]
        thumbs += [(str(item.path), item.caption[:60]) for item in items[: max(0, 8 - len(thumbs))]]
    lines.insert(1, f"{total} images in {len(subsets)} subset(s)")
    return "\n".join(lines), thumbs


def native_resolution(model: str) -> int | None:
    """The model's default image side, read from its folder's configs (no weights loaded)."""
    from pipelines.models import ModelLoadError, resolve_model_path

    try:
        folder = resolve_model_path(model)
        unet = json.loads((Path(folder) / "unet" / "config.json").read_text())
        vae = json.loads((Path(folder) / "vae" / "config.json").read_text())
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (ModelLoadError, OSError, KeyError, TypeError, ValueError):
        return None


def list_datasets(policy: PathPolicy) -> list[str]:
    return sorted(p.name for p in policy.data.iterdir() if p.is_dir() and not p.name.startswith("."))


# ----- running --------------------------------------------------------------------------------------------
def command_for(config_path: Path, *, resume: bool, progress_file: Path | None = None, python: str = "") -> list[str]:
    cmd = [python or sys.executable, "-m", "trainers.cli", "--config", str(config_path)]
    if progress_file is not None:
        cmd += ["--set", f"logging.progress_file={json.dumps(str(progress_file))}"]
    return cmd + (["--resume"] if resume else [])


def shown_command(config_path: Path, *, resume: bool) -> str:
    return shlex.join(["lyco-train", "--config", str(config_path)] + (["--resume"] if resume else []))


def start_training(ctx: UIContext, base: Mapping[str, Any], values: Mapping[str, Any], *, resume: bool = False) -> tuple[bool, str]:
    """(started, message): check everything, write the run folder, launch lyco-train."""
    from trainers.config_io import dump_toml
    from .jobs import JobBusy

    if ctx.job.alive:
        return False, f"A training is already running (pid {ctx.job.pid}); only one runs at a time. Stop it or wait."
    try:
        data = form_to_config(values, base, ctx.policy)
    except (TypeError, ValueError) as err:
        return False, f"Invalid form value: {err}"
    config, final, problems = check_config(data, ctx.policy, resume=resume)
    if problems:
        return False, "Configuration problems:\n" + "\n".join(f"- {p}" for p in problems)
    run_dir = ctx.policy.work / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{safe_name(config.saving.output_name)}"
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.toml"
    config_path.write_text(dump_toml(config), encoding="utf-8")
    progress = run_dir / "progress.jsonl"
    try:
        ctx.job.start(command_for(config_path, resume=resume, progress_file=progress, python=ctx.python),
                      log_path=run_dir / "train.log", progress_path=progress, cwd=ctx.policy.work, run_dir=run_dir)
    except JobBusy as err:
        return False, str(err)
    return True, f"Started: `{shown_command(config_path, resume=resume)}` (run folder {run_dir})"


def status_view(ctx: UIContext) -> dict[str, Any]:
    """Everything the live panel shows, from the actual process and its progress file."""
    status = ctx.job.status()
    p = status.progress
    head = f"**State: {status.state}**" + (f" · pid {status.pid}" if status.pid else "") + f" · {status.message}"
    parts = []
    if p.started or p.step:
        parts.append(f"Step {p.step} / {p.total_steps or '?'}")
    if p.loss is not None:
        parts.append(f"loss {p.loss:.4f}" + (f" (avg {p.loss_avg:.4f})" if p.loss_avg is not None else ""))
    if p.lr:
        parts.append("lr " + ", ".join(f"{k} {v:.2e}" for k, v in p.lr.items()))
    if status.alive and p.eta_s is not None:
        parts.append(f"ETA {_duration(p.eta_s)}")
    if p.it_per_s:
        parts.append(f"{p.it_per_s:.3g} it/s")
    if status.alive and not p.started:
        parts.append("loading the model and data...")
    return {
        "state": status.state, "alive": status.alive, "status": head, "progress": " · ".join(parts) or "—",
        "losses": list(p.losses), "samples": [(path, f"step {p.sample_step}") for path in p.samples if Path(path).is_file()],
        "log": "\n".join(ctx.job.log_tail().splitlines()[-LOG_LINES:]), "saved": list(p.saved),
    }


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


# ----- the tab ------------------------------------------------------------------------------------------
def model_choices(policy: PathPolicy) -> list[str]:
    from pipelines.models import builtin_names

    found = []
    for root in policy.models:
        if root.is_dir():
            found += sorted(str(p.parent) for p in root.glob("*/model_index.json"))
            found += sorted(str(p) for p in root.glob("*.safetensors"))
    return builtin_names() + found


def _loss_frame(losses: list[tuple[int, float]]):
    import pandas as pd

    return pd.DataFrame({"step": pd.Series([s for s, _ in losses], dtype="int64"),
                         "loss": pd.Series([v for _, v in losses], dtype="float64")})


def build(ctx: UIContext) -> None:
    """The Train tab's components and events (inside a gr.Blocks / gr.Tab context)."""
    import gradio as gr

    from lyco.targets import PRESETS
    from trainers.config import LR_SCHEDULERS, OPTIMIZERS

    policy = ctx.policy
    initial = config_to_form(DEFAULT_CONFIG, policy)
    base = gr.State(copy.deepcopy(DEFAULT_CONFIG))
    f: dict[str, Any] = {}

    def eid(name: str) -> str:
        return "train-" + name.replace("_", "-")

    with gr.Row():
        with gr.Column(scale=3):
            with gr.Accordion("Model and dataset", open=True):
                f["model"] = gr.Dropdown(model_choices(policy), value=initial["model"], allow_custom_value=True, label="Base model",
                                         info="builtin:*, a diffusers folder or checkpoint in a model folder, or a hub id", elem_id=eid("model"))
                with gr.Row():
                    f["data_dir"] = gr.Dropdown(list_datasets(policy), value=None, allow_custom_value=True, label="Dataset folder", scale=4,
                                                info=f"in {policy.data}: <repeats>_<name> subfolders of images + .txt captions", elem_id=eid("data_dir"))
                    data_refresh = gr.Button("Refresh list", elem_id="train-data-refresh", scale=1, size="sm")
                f["generate_concept"] = gr.Checkbox(initial["generate_concept"], label="Write the synthetic 'sks' concept dataset there if the folder is missing (for builtin:tiny-sd)", elem_id=eid("generate_concept"))
                preview_button = gr.Button("Preview dataset", elem_id="train-preview-button", size="sm")
                preview_text = gr.Markdown(elem_id="train-preview")
                preview_images = gr.Gallery(label="Dataset images", columns=8, height=140, elem_id="train-preview-images", allow_preview=False)
            with gr.Accordion("Network", open=True):
                with gr.Row():
                    f["algo"] = gr.Radio(["lora", "loha", "lokr"], value=initial["algo"], label="Algorithm", info="lora = LoCon when conv rank is set", elem_id=eid("algo"))
                    f["preset"] = gr.Dropdown(list(PRESETS), value=initial["preset"], label="Target preset", elem_id=eid("preset"))
                with gr.Row():
                    f["rank"] = gr.Number(initial["rank"], label="Rank", precision=0, minimum=1, elem_id=eid("rank"))
                    f["alpha"] = gr.Number(initial["alpha"], label="Alpha (0 = rank)", minimum=0, elem_id=eid("alpha"))
                    f["conv_rank"] = gr.Number(initial["conv_rank"], label="Conv rank (0 = no convs)", precision=0, minimum=0, elem_id=eid("conv_rank"))
                    f["conv_alpha"] = gr.Number(initial["conv_alpha"], label="Conv alpha (0 = alpha)", minimum=0, elem_id=eid("conv_alpha"))
                with gr.Row(visible=initial["algo"] == "lokr") as lokr_row:
                    f["factor"] = gr.Number(initial["factor"], label="LoKr factor (-1 = auto)", precision=0, elem_id=eid("factor"))
                    f["decompose_both"] = gr.Checkbox(initial["decompose_both"], label="Decompose both factors", elem_id=eid("decompose_both"))
                    f["full_matrix"] = gr.Checkbox(initial["full_matrix"], label="Full matrix (no rank)", elem_id=eid("full_matrix"))
                with gr.Row():
                    f["dora"] = gr.Checkbox(initial["dora"], label="DoRA", elem_id=eid("dora"))
                    f["train_text_encoder"] = gr.Checkbox(initial["train_text_encoder"], label="Train the text encoder too", elem_id=eid("train_text_encoder"))
            with gr.Accordion("Training", open=True):
                with gr.Row():
                    f["length_unit"] = gr.Radio(["steps", "epochs"], value=initial["length_unit"], label="Train for", elem_id=eid("length_unit"))
                    f["length"] = gr.Number(initial["length"], label="Steps / epochs", precision=0, minimum=1, elem_id=eid("length"))
                    f["batch_size"] = gr.Number(initial["batch_size"], label="Batch size", precision=0, minimum=1, elem_id=eid("batch_size"))
                    f["resolution"] = gr.Number(initial["resolution"], label="Resolution (0 = model's)", precision=0, minimum=0, elem_id=eid("resolution"))
                with gr.Row():
                    f["learning_rate"] = gr.Number(initial["learning_rate"], label="Learning rate", elem_id=eid("learning_rate"))
                    f["unet_lr"] = gr.Textbox(initial["unet_lr"], label="UNet LR", placeholder="= learning rate", elem_id=eid("unet_lr"))
                    f["text_encoder_lr"] = gr.Textbox(initial["text_encoder_lr"], label="Text-encoder LR (0 = frozen)", placeholder="= learning rate", elem_id=eid("text_encoder_lr"))
                    f["seed"] = gr.Number(initial["seed"], label="Seed", precision=0, elem_id=eid("seed"))
                with gr.Row():
                    f["optimizer"] = gr.Dropdown(list(OPTIMIZERS), value=initial["optimizer"], label="Optimizer", elem_id=eid("optimizer"))
                    f["scheduler"] = gr.Dropdown(list(LR_SCHEDULERS), value=initial["scheduler"], label="LR scheduler", elem_id=eid("scheduler"))
                    f["warmup"] = gr.Number(initial["warmup"], label="Warmup (steps, or < 1: fraction)", minimum=0, elem_id=eid("warmup"))
                with gr.Row():
                    f["mixed_precision"] = gr.Dropdown(["no", "fp16", "bf16"], value=initial["mixed_precision"], label="Mixed precision (GPU)", elem_id=eid("mixed_precision"))
                    f["save_precision"] = gr.Dropdown(["fp16", "bf16", "fp32"], value=initial["save_precision"], label="Save precision", elem_id=eid("save_precision"))
                    f["cache_latents"] = gr.Checkbox(initial["cache_latents"], label="Cache latents", elem_id=eid("cache_latents"))
                    f["flip_aug"] = gr.Checkbox(initial["flip_aug"], label="Random flips", elem_id=eid("flip_aug"))
                    f["enable_bucket"] = gr.Checkbox(initial["enable_bucket"], label="Aspect buckets", elem_id=eid("enable_bucket"))
            with gr.Accordion("Samples and output", open=True):
                f["sample_prompts"] = gr.Textbox(initial["sample_prompts"], lines=2, label="Sample prompts (one per line; drawn at the end)", elem_id=eid("sample_prompts"))
                with gr.Row():
                    f["sample_every"] = gr.Number(initial["sample_every"], label="Sample every N steps (0 = end only)", precision=0, minimum=0, elem_id=eid("sample_every"))
                    f["sample_steps"] = gr.Number(initial["sample_steps"], label="Sampling steps", precision=0, minimum=1, elem_id=eid("sample_steps"))
                    f["save_every"] = gr.Number(initial["save_every"], label="Save every N steps (0 = end only)", precision=0, minimum=0, elem_id=eid("save_every"))
                with gr.Row():
                    f["output_name"] = gr.Textbox(initial["output_name"], label="Output name", elem_id=eid("output_name"))
                    f["output_dir"] = gr.Textbox(initial["output_dir"], label="Output folder", placeholder="(empty: <adapter folder>/<output name>)", elem_id=eid("output_dir"))
                    f["overwrite"] = gr.Checkbox(initial["overwrite"], label="Overwrite", elem_id=eid("overwrite"))
            with gr.Accordion("Config file (the TOML lyco-train reads)", open=False):
                config_path = gr.Textbox("configs/my_adapter.toml", label=f"Config path (in {policy.work})", elem_id="train-config-path")
                with gr.Row():
                    load_button = gr.Button("Load config", elem_id="train-load-config", size="sm")
                    save_button = gr.Button("Save config", elem_id="train-save-config", size="sm")
                    command_button = gr.Button("Show command", elem_id="train-show-command", size="sm")
                upload = gr.File(label="...or upload a config", file_types=[".toml"], elem_id="train-config-upload")
                command = gr.Textbox(label="Command", interactive=False, elem_id="train-command", buttons=["copy"])
                saved_file = gr.File(label="Saved config", interactive=False, elem_id="train-saved-config")
        with gr.Column(scale=2):
            with gr.Row():
                start = gr.Button("Start training", variant="primary", elem_id="train-start")
                stop = gr.Button("Stop", variant="stop", interactive=False, elem_id="train-stop")
                resume = gr.Checkbox(False, label="Resume from the last saved state", elem_id="train-resume")
            messages = gr.Markdown(elem_id="train-errors")
            status = gr.Markdown("**State: idle**", elem_id="train-status")
            progress = gr.Markdown("—", elem_id="train-progress")
            loss_plot = gr.LinePlot(_loss_frame([]), x="step", y="loss", title="Loss", height=220, elem_id="train-loss")
            samples = gr.Gallery(label="Latest samples", columns=4, height=180, elem_id="train-samples")
            log = gr.Textbox(label="Log", lines=10, max_lines=10, autoscroll=True, interactive=False, elem_id="train-log")
    seen = gr.State({})
    timer = gr.Timer(ctx.refresh_s)
    fields = [f[name] for name in FIELDS]

    def values_of(args: tuple) -> dict[str, Any]:
        return dict(zip(FIELDS, args))

    def on_start(base_data, resume_flag, *args):
        ok, text = start_training(ctx, base_data, values_of(args), resume=bool(resume_flag))
        return text, gr.update(interactive=not ok and not ctx.job.alive), gr.update(interactive=ok or ctx.job.alive)

    def on_stop():
        ctx.job.stop()
        return gr.update(interactive=False)

    def on_tick(previous):
        view = status_view(ctx)
        outputs = {"status": view["status"], "progress": view["progress"], "loss": view["losses"], "samples": view["samples"],
                   "log": view["log"], "buttons": view["alive"]}
        signatures = {key: hash(repr(value)) for key, value in outputs.items()}
        fresh = lambda key: signatures[key] != (previous or {}).get(key)  # noqa: E731
        result = [signatures]
        result.append(view["status"] if fresh("status") else gr.skip())
        result.append(view["progress"] if fresh("progress") else gr.skip())
        result.append(_loss_frame(view["losses"]) if fresh("loss") else gr.skip())
        result.append(view["samples"] if fresh("samples") else gr.skip())
        result.append(view["log"] if fresh("log") else gr.skip())
        alive = view["alive"]
        result += [gr.update(interactive=not alive), gr.update(interactive=alive)] if fresh("buttons") else [gr.skip(), gr.skip()]
        return result

    def loaded(data, problems):
        if data is None:
            return [gr.skip(), "Could not load the config:\n" + "\n".join(f"- {p}" for p in problems)] + [gr.skip()] * len(FIELDS)
        values = config_to_form(data, policy)
        text = "Config loaded." + ("\nProblems to fix before starting:\n" + "\n".join(f"- {p}" for p in problems) if problems else "")
        return [data, text] + [values[name] for name in FIELDS]

    def on_load(path_text):
        try:
            path = policy.resolve(path_text, base="work", what="config file", must_exist=True, kind="file")
        except PathNotAllowed as err:
            return loaded(None, [str(err)])
        return loaded(*load_config_file(policy, path))

    def on_upload(file):
        if not file:
            return loaded(None, ["no file"])
        try:
            path = policy.uploaded(file)
        except PathNotAllowed as err:
            return loaded(None, [str(err)])
        return loaded(*load_config_file(policy, path))

    def on_save(base_data, target, resume_flag, *args):
        path, problems = save_config_file(policy, form_to_config(values_of(args), base_data, policy), target)
        if path is None:
            return "Config not saved:\n" + "\n".join(f"- {p}" for p in problems), gr.skip(), gr.skip()
        return f"Saved {path}", str(path), shown_command(path, resume=bool(resume_flag))

    def on_preview(data_dir, model, resolution, enable_bucket):
        if not data_dir:
            return "Pick a dataset folder.", []
        return preview_dataset(policy, data_dir, model=model or "", resolution=resolution, enable_bucket=bool(enable_bucket))

    log.change(None, None, None, js="() => { const t = document.querySelector('#train-log textarea'); if (t) t.scrollTop = t.scrollHeight; }")
    f["algo"].change(lambda algo: gr.update(visible=algo == "lokr"), f["algo"], lokr_row, show_progress="hidden")
    data_refresh.click(lambda: gr.update(choices=list_datasets(policy)), None, f["data_dir"], show_progress="hidden")
    preview_inputs = [f["data_dir"], f["model"], f["resolution"], f["enable_bucket"]]
    preview_button.click(on_preview, preview_inputs, [preview_text, preview_images], concurrency_id="train-light", concurrency_limit=4)
    f["data_dir"].change(on_preview, preview_inputs, [preview_text, preview_images], concurrency_id="train-light", concurrency_limit=4)
    start.click(on_start, [base, resume, *fields], [messages, start, stop], concurrency_id="train-control", concurrency_limit=1)
    stop.click(on_stop, None, stop, concurrency_id="train-stop", concurrency_limit=None)
    timer.tick(on_tick, seen, [seen, status, progress, loss_plot, samples, log, start, stop], show_progress="hidden",
               concurrency_limit=None, trigger_mode="once")
    load_outputs = [base, messages, *fields]
    load_button.click(on_load, config_path, load_outputs, concurrency_id="train-light", concurrency_limit=4)
    upload.upload(on_upload, upload, load_outputs, concurrency_id="train-light", concurrency_limit=4)
    save_button.click(on_save, [base, config_path, resume, *fields], [messages, saved_file, command], concurrency_id="train-light", concurrency_limit=4)
    command_button.click(on_save, [base, config_path, resume, *fields], [messages, saved_file, command], concurrency_id="train-light", concurrency_limit=4)
