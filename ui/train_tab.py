"""Train tab: a form over the lyco-train TOML, a dataset preview, and the live view of the child process.

The form edits a config dict (the "base": defaults, or a loaded TOML). Only fields the user changed
are written back, so keys the form does not show survive a load/save round trip unchanged. Every
path is checked against the UI's folders before anything starts, and errors name the config field.
"""
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

FIELDS = (
    "model", "data_dir", "generate_concept", "algo", "preset", "rank", "alpha", "conv_rank", "conv_alpha", "factor",
    "decompose_both", "full_matrix", "dora", "train_text_encoder", "length_unit", "length", "batch_size", "resolution",
    "learning_rate", "unet_lr", "text_encoder_lr", "optimizer", "scheduler", "warmup", "mixed_precision", "save_precision",
    "seed", "cache_latents", "flip_aug", "enable_bucket", "sample_prompts", "sample_every", "sample_steps", "output_name",
    "output_dir", "save_every", "overwrite",
)
LOKR_FIELDS = ("factor", "decompose_both", "full_matrix")
LOG_LINES = 60
DEFAULT_CONFIG: dict[str, Any] = {
    "model": {"path": "builtin:tiny-sd"},
    "network": {"algo": "lora", "rank": 8, "alpha": 8.0},
    "dataset": {"batch_size": 4, "cache_latents": "memory", "flip_aug": True},
    "training": {"max_train_steps": 200, "seed": 0},
    "optimizer": {"type": "AdamW", "learning_rate": 1e-3, "lr_scheduler": "cosine", "lr_warmup_steps": 0.05},
    "saving": {"output_name": "my_adapter"},
    "sampling": {"steps": 20, "cfg_scale": 5.0, "prompts": [{"prompt": "a photo of sks", "seed": 1}]},
    "logging": {"trackers": []},
}
# (section, key, role, write): every path lyco-train reads or writes, checked before a start.
PATH_KEYS = (
    ("model", "config_dir", "models", False), ("dataset", "train_data_dir", "data", False), ("dataset", "reg_data_dir", "data", False),
    ("dataset", "cache_dir", "work", True), ("network", "weights", "adapters", False), ("saving", "output_dir", "adapters", True),
    ("logging", "logging_dir", "work", True), ("logging", "progress_file", "work", True),
)


# ----- config <-> form ----------------------------------------------------------------------------------
def config_to_form(data: Mapping[str, Any], policy: PathPolicy) -> dict[str, Any]:
    """The form values that show `data` (a config dict)."""
    g = lambda section, key, default=None: (data.get(section) or {}).get(key, default)  # noqa: E731
    epochs = g("training", "max_train_epochs")
    resolution = g("dataset", "resolution")
    if isinstance(resolution, list):
        resolution = max(resolution) if resolution else None
    algo = g("network", "algo", "lora")
    return {
        "model": g("model", "path", "builtin:tiny-sd"),
        "data_dir": _show_path(g("dataset", "train_data_dir"), policy.data),
        "generate_concept": g("dataset", "generate") == "concept",
        "algo": "lora" if algo == "locon" else algo,
        "preset": g("network", "preset", "attn-mlp"),
        "rank": g("network", "rank", 8),
        "alpha": g("network", "alpha") or 0,
        "conv_rank": g("network", "conv_rank") or 0,
        "conv_alpha": g("network", "conv_alpha") or 0,
        "factor": g("network", "factor", -1),
        "decompose_both": g("network", "decompose_both", False),
        "full_matrix": g("network", "full_matrix", False),
        "dora": g("network", "dora", False),
        "train_text_encoder": g("network", "train_text_encoder", True),
        "length_unit": "epochs" if epochs else "steps",
        "length": epochs or g("training", "max_train_steps") or 1600,
        "batch_size": g("dataset", "batch_size", 1),
        "resolution": resolution or 0,
        "learning_rate": g("optimizer", "learning_rate", 1e-4),
        "unet_lr": _number_text(g("optimizer", "unet_lr")),
        "text_encoder_lr": _number_text(g("optimizer", "text_encoder_lr")),
        "optimizer": g("optimizer", "type", "AdamW"),
        "scheduler": g("optimizer", "lr_scheduler", "constant"),
        "warmup": g("optimizer", "lr_warmup_steps", 0),
        "mixed_precision": g("training", "mixed_precision", "no"),
        "save_precision": g("saving", "save_precision", "fp16"),
        "seed": g("training", "seed", 42),
        "cache_latents": g("dataset", "cache_latents", "none") != "none",
        "flip_aug": g("dataset", "flip_aug", False),
        "enable_bucket": g("dataset", "enable_bucket", False),
        "sample_prompts": "\n".join(p.get("prompt", "") for p in g("sampling", "prompts", []) or []),
        "sample_every": g("sampling", "every_n_steps") or 0,
        "sample_steps": g("sampling", "steps", 20),
        "output_name": g("saving", "output_name", "lyco"),
        "output_dir": _show_path(g("saving", "output_dir"), policy.adapters),
        "save_every": g("saving", "save_every_n_steps") or 0,
        "overwrite": g("saving", "overwrite", False),
    }


def form_to_config(values: Mapping[str, Any], base: Mapping[str, Any], policy: PathPolicy) -> dict[str, Any]:
    """`base` with the form fields the user changed written in; paths are not checked here."""
    shown = config_to_form(base, policy)
    data = copy.deepcopy(dict(base))
    changed = {name for name in FIELDS if name in values and _differs(values[name], shown[name])}

    def put(section: str, key: str, value: Any) -> None:
        table = data.setdefault(section, {})
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value

    simple = {
        "model": ("model", "path", _text), "algo": ("network", "algo", str), "preset": ("network", "preset", str),
        "rank": ("network", "rank", int), "alpha": ("network", "alpha", _opt_float), "conv_rank": ("network", "conv_rank", _opt_int),
        "conv_alpha": ("network", "conv_alpha", _opt_float), "factor": ("network", "factor", int),
        "decompose_both": ("network", "decompose_both", bool), "full_matrix": ("network", "full_matrix", bool),
        "dora": ("network", "dora", bool), "train_text_encoder": ("network", "train_text_encoder", bool),
        "batch_size": ("dataset", "batch_size", int), "resolution": ("dataset", "resolution", _opt_int),
        "learning_rate": ("optimizer", "learning_rate", float), "unet_lr": ("optimizer", "unet_lr", _opt_lr),
        "text_encoder_lr": ("optimizer", "text_encoder_lr", _opt_lr), "optimizer": ("optimizer", "type", str),
        "scheduler": ("optimizer", "lr_scheduler", str), "warmup": ("optimizer", "lr_warmup_steps", _warmup),
        "mixed_precision": ("training", "mixed_precision", str), "save_precision": ("saving", "save_precision", str),
        "seed": ("training", "seed", int), "flip_aug": ("dataset", "flip_aug", bool), "enable_bucket": ("dataset", "enable_bucket", bool),
        "sample_every": ("sampling", "every_n_steps", _opt_int), "sample_steps": ("sampling", "steps", int),
        "output_name": ("saving", "output_name", _text), "save_every": ("saving", "save_every_n_steps", _opt_int),
        "overwrite": ("saving", "overwrite", bool),
    }
    for name in changed & set(simple):
        section, key, convert = simple[name]
        try:
            put(section, key, convert(values[name]))
        except (TypeError, ValueError):
            raise ValueError(f"{section}.{key}: {values[name]!r} is not a valid value") from None
    if "data_dir" in changed:
        put("dataset", "train_data_dir", _full_path(values["data_dir"], policy.data))
    if "output_dir" in changed:
        put("saving", "output_dir", _full_path(values["output_dir"], policy.adapters))
    if "generate_concept" in changed:
        put("dataset", "generate", "concept" if values["generate_concept"] else None)
    if "cache_latents" in changed:
        put("dataset", "cache_latents", "memory" if values["cache_latents"] else "none")
    if changed & {"length_unit", "length"}:
        epochs = values.get("length_unit", shown["length_unit"]) == "epochs"
        length = _opt_int(values.get("length", shown["length"]))
        put("training", "max_train_epochs" if epochs else "max_train_steps", length)
        put("training", "max_train_steps" if epochs else "max_train_epochs", None)
    if "sample_prompts" in changed:
        put("sampling", "prompts", _prompts(values["sample_prompts"], (base.get("sampling") or {}).get("prompts") or []))
    if values.get("algo", shown["algo"]) != "lokr":
        for key in LOKR_FIELDS:
            data.get("network", {}).pop(key, None)
    return data


def finalize_config(data: Mapping[str, Any], policy: PathPolicy) -> tuple[dict[str, Any], list[str]]:
    """The config with every path resolved inside the UI's folders (output folder defaulted to
    `<adapter folder>/<output_name>`), and the problems, one per field."""
    data = copy.deepcopy(dict(data))
    problems: list[str] = []
    saving = data.setdefault("saving", {})
    if not saving.get("output_dir"):
        saving["output_dir"] = str(policy.adapters / safe_name(str(saving.get("output_name") or "lyco")))
    generated = (data.get("dataset") or {}).get("generate") is not None
    for section, key, role, write in PATH_KEYS:
        value = (data.get(section) or {}).get(key)
        if value in (None, ""):
            continue
        writes = write or (section == "dataset" and key == "train_data_dir" and generated)
        try:
            data[section][key] = str(policy.resolve(value, base=role, write=writes, what=f"{section}.{key}"))
        except PathNotAllowed as err:
            problems.append(str(err))
    for index, subset in enumerate((data.get("dataset") or {}).get("subsets") or []):
        try:
            subset["image_dir"] = str(policy.resolve(subset.get("image_dir", ""), base="data", what=f"dataset.subsets[{index}].image_dir"))
        except PathNotAllowed as err:
            problems.append(str(err))
    try:
        data.setdefault("model", {})["path"] = policy.model(str((data.get("model") or {}).get("path", "")))
    except PathNotAllowed as err:
        problems.append(f"model.path: {err}")
    return data, problems


def check_config(data: Mapping[str, Any], policy: PathPolicy, *, resume: bool = False) -> tuple[Any, dict[str, Any], list[str]]:
    """(TrainConfig or None, the final dict, problems): paths, schema, files and packages, as lyco-train checks them."""
    from trainers.config_io import ConfigError, check_environment, validate
    from trainers.outputs import final_adapter_path, latest_state

    final, problems = finalize_config(data, policy)
    if problems:
        return None, final, problems
    try:
        config = validate(final)
        problems = check_environment(config)
    except ConfigError as err:
        return None, final, err.problems
    if not problems:
        target = final_adapter_path(config)
        if resume and latest_state(config.saving.output_dir) is None:
            problems.append(f"resume: no saved state under {config.saving.output_dir}/state; untick resume to start fresh")
        elif not resume and target.exists() and not config.saving.overwrite:
            problems.append(f"saving.output_name: {target} already exists; tick overwrite, choose another output name, or resume")
    return (None if problems else config), final, problems


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


# ----- small converters -----------------------------------------------------------------------------------
def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) != float(b)
    if a in ("", None) and b in ("", None):
        return False
    return a != b


def _text(value: Any) -> str:
    return str(value or "").strip()


def _opt_int(value: Any) -> int | None:
    return None if value in (None, "") or int(value) == 0 else int(value)


def _opt_float(value: Any) -> float | None:
    """Optional number; empty (and 0, for alphas) means unset."""
    return None if value in (None, "") or float(value) == 0 else float(value)


def _opt_lr(value: Any) -> float | None:
    """A learning-rate text: empty = unset (use learning_rate), 0 = frozen."""
    text = str(value if value is not None else "").strip()
    return None if not text else float(text)


def _number_text(value: Any) -> str:
    return "" if value is None else f"{value:g}"


def _warmup(value: Any) -> int | float:
    number = float(value or 0)
    return number if 0 < number < 1 else int(number)


def _prompts(text: str, previous: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_text = {p.get("prompt"): p for p in previous}
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return [dict(by_text.get(line, {"prompt": line})) for line in lines]


def _show_path(value: str | None, root: Path) -> str:
    if not value:
        return ""
    path = Path(value)
    return str(path.relative_to(root)) if path.is_absolute() and path.is_relative_to(root) else str(value)


def _full_path(value: str | None, root: Path) -> str | None:
    text = (value or "").strip()
    if not text:
        return None
    path = Path(text).expanduser()
    return str(path if path.is_absolute() else root / path)


# ----- load / save ----------------------------------------------------------------------------------------
def absolute_paths(data: Mapping[str, Any], policy: PathPolicy) -> dict[str, Any]:
    """A loaded config with relative paths made absolute the way lyco-train (run in the work folder) reads them."""
    data = copy.deepcopy(dict(data))
    for section, key, _, _ in PATH_KEYS:
        value = (data.get(section) or {}).get(key)
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            data[section][key] = str(policy.work / value)
    for subset in (data.get("dataset") or {}).get("subsets") or []:
        if isinstance(subset.get("image_dir"), str) and not Path(subset["image_dir"]).is_absolute():
            subset["image_dir"] = str(policy.work / subset["image_dir"])
    model = (data.get("model") or {}).get("path")
    if isinstance(model, str) and (model.startswith(".") or "/" in model) and not Path(model).is_absolute() and (policy.work / model).exists():
        data["model"]["path"] = str(policy.work / model)
    return data


def load_config_file(policy: PathPolicy, path: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """(config dict with absolute paths, problems) of a TOML file; None when it cannot be read at all."""
    from trainers.config_io import ConfigError, read_toml

    try:
        data = absolute_paths(read_toml(path), policy)
    except ConfigError as err:
        return None, err.problems
    _, _, problems = check_config(data, policy)
    return data, problems


def save_config_file(policy: PathPolicy, data: Mapping[str, Any], target: str) -> tuple[Path | None, list[str]]:
    """Validate and write the config as TOML (the file lyco-train reads) to `target` inside the work folder."""
    from trainers.config_io import ConfigError, dump_toml, validate

    try:
        path = policy.resolve(target if target.endswith(".toml") else target + ".toml", base="work", write=True, what="config file")
    except PathNotAllowed as err:
        return None, [str(err)]
    final, problems = finalize_config(data, policy)
    if problems:
        return None, problems
    try:
        config = validate(final, source=str(path))
    except ConfigError as err:
        return None, err.problems
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_toml(config), encoding="utf-8")
    return path, []


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
