"""The Train form <-> lyco-train config mapping, and the checks run before a config is saved or started.

The form edits a config dict (the "base": defaults, or a loaded TOML). Only fields the user changed
are written back, so keys the form does not show survive a load/save round trip unchanged. Every
path is checked against the UI's folders before anything starts, and errors name the config field.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

from .paths import PathNotAllowed, PathPolicy, safe_name

FIELDS = (
    "model", "data_dir", "generate_concept", "algo", "preset", "rank", "alpha", "conv_rank", "conv_alpha", "factor",
    "decompose_both", "full_matrix", "dora", "train_text_encoder", "length_unit", "length", "batch_size", "resolution",
    "learning_rate", "unet_lr", "text_encoder_lr", "optimizer", "scheduler", "warmup", "mixed_precision", "save_precision",
    "seed", "cache_latents", "flip_aug", "enable_bucket", "sample_prompts", "sample_every", "sample_steps", "output_name",
    "output_dir", "save_every", "overwrite",
)
LOKR_FIELDS = ("factor", "decompose_both", "full_matrix")
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
