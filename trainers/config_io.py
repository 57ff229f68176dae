"""Reading, overriding, validating and printing lyco-train configs.

Every problem is reported before any model loads, as `ConfigError` with one line per problem:
the dotted field name, what is wrong and, for unknown keys or values, the nearest valid one.
"""
from __future__ import annotations

import difflib
import importlib.util
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Iterable, Sequence

from pydantic import BaseModel, ValidationError

from .config import OPTIMIZERS, TrainConfig

_OPTIONAL_PACKAGES = {"AdamW8bit": "bitsandbytes", "Lion8bit": "bitsandbytes", "Prodigy": "prodigyopt", "Lion": "lion_pytorch"}
_PIP_NAMES = {"bitsandbytes": "bitsandbytes", "prodigyopt": "prodigyopt", "lion_pytorch": "lion-pytorch", "xformers": "xformers", "wandb": "wandb"}


class ConfigError(ValueError):
    """Invalid configuration; `problems` holds one message per field."""

    def __init__(self, problems: Sequence[str], source: str = "config") -> None:
        self.problems = list(problems)
        super().__init__(f"{source}: {len(self.problems)} problem(s):\n  " + "\n  ".join(self.problems))


# ----- reading and overriding ------------------------------------------------------------------------
def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file {path} does not exist"], str(path))
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError([f"not valid TOML: {err}"], str(path)) from None


def parse_value(text: str) -> Any:
    """A `--set` value: any TOML value (10, 1e-4, true, "x", [1, 2], {a = 1}), else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], assignments: Iterable[str]) -> dict[str, Any]:
    """Apply `section.key=value` assignments (list items by index: `dataset.subsets.0.num_repeats=3`)
    to a copy of `data`."""
    import copy

    data = copy.deepcopy(data)
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        parts = [p for p in key.strip().split(".") if p]
        if not sep or not parts:
            raise ConfigError([f"--set {assignment!r}: expected section.key=value"], "--set")
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                node = _list_item(node, part, where)
                continue
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError([f"--set {assignment!r}: {where} is a value, not a table"], "--set")
        last = parts[-1]
        if isinstance(node, list):
            node[_index(node, last, key)] = parse_value(raw.strip())
        else:
            node[last] = parse_value(raw.strip())
    return data


def _index(items: list, text: str, where: str) -> int:
    if not text.isdigit() or int(text) >= len(items):
        raise ConfigError([f"--set {where}: {text!r} is not an index of a list of {len(items)}"], "--set")
    return int(text)


def _list_item(items: list, text: str, where: str) -> Any:
    return items[_index(items, text, where)]


# ----- validation ------------------------------------------------------------------------------------
def validate(data: dict[str, Any], *, source: str = "config") -> TrainConfig:
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_messages(err.errors(), data), source) from None


def _messages(errors: list[dict], data: dict[str, Any]) -> list[str]:
    """One message per problem; the alternatives of a union (int or list) merge into one line."""
    merged: dict[str, list[str]] = {}
    values: dict[str, Any] = {}
    out: list[str] = []
    for error in errors:
        kind = error["type"]
        if kind.endswith("_type") or kind.endswith("_parsing"):
            where = _dotted(_field_loc(error["loc"])) or "config"
            merged.setdefault(where, [])
            if _expected(kind) not in merged[where]:
                merged[where].append(_expected(kind))
            values[where] = error.get("input")
            if len(merged[where]) == 1:
                out.append(where)
        else:
            out.append(_describe(error, data))
    return [f"{m}: expected {' or '.join(merged[m])}, got {type(values[m]).__name__} {values[m]!r}" if m in merged else m for m in out]


def load_config(path: str | os.PathLike, overrides: Iterable[str] = (), *, check_paths: bool = True) -> TrainConfig:
    """Read, override, validate and (optionally) check paths and packages: everything that can be
    checked without loading a model."""
    data = apply_overrides(read_toml(path), overrides)
    config = validate(data, source=str(path))
    if check_paths:
        problems = check_environment(config)
        if problems:
            raise ConfigError(problems, str(path))
    return config


def _describe(error: dict, data: dict[str, Any]) -> str:
    loc = _field_loc(error["loc"])
    where = _dotted(loc) or "config"
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{where}: unknown key{_suggest_key(loc)}"
    value = error.get("input")
    if kind == "literal_error":
        options = [o.strip().strip("'") for o in error["ctx"]["expected"].replace(" or ", ", ").split(", ")]
        return f"{where}: {value!r} is not one of {options}{_nearest(value, options)}"
    if kind == "missing":
        return f"{where}: required key is missing"
    if kind == "value_error":
        message = str(error["msg"]).removeprefix("Value error, ")
        if not loc:
            return message
        if message.startswith("type: unknown optimizer"):
            return f"{where}.{message}{_nearest(value.get('type') if isinstance(value, dict) else None, OPTIMIZERS)}"
        return f"{where}: {message}"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return f"{where}: expected {_expected(kind)}, got {type(value).__name__} {value!r}"
    return f"{where}: {error['msg']} (got {value!r})"


_TYPE_MARKER = re.compile(r"^(int|float|bool|str|list|dict|tuple|literal|function|nullable|union|lax|strict|json)\b|\[")


def _field_loc(loc: tuple) -> tuple:
    """The location as the user wrote it: pydantic's union-member markers ('int', 'list[int]') dropped."""
    out: list = []
    model: Any = TrainConfig
    for part in loc:
        if isinstance(part, int):
            out.append(part)
        elif model is not None and part in model.model_fields:
            out.append(part)
            model = _inner_model(model.model_fields[part].annotation)
        elif model is not None:  # a key the model does not have
            out.append(part)
            model = None
        elif not _TYPE_MARKER.search(part):
            out.append(part)
    return tuple(out)


def _inner_model(annotation: Any) -> Any:
    """The BaseModel class inside an annotation such as `list[SubsetSection]` or `Optional[X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _dotted(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _model_at(loc: tuple) -> Any:
    model: Any = TrainConfig
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        model = _inner_model(model.model_fields[part].annotation)
    return model


def _suggest_key(loc: tuple) -> str:
    parent = _model_at(loc[:-1])
    name = str(loc[-1])
    if parent is None:
        return ""
    close = difflib.get_close_matches(name, list(parent.model_fields), n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    for section, info in TrainConfig.model_fields.items():  # a key that belongs to another section
        if name in info.annotation.model_fields:
            return f"; did you mean {section}.{name}?"
    return f"; valid keys: {', '.join(parent.model_fields)}"


def _nearest(value: Any, options: Iterable[str]) -> str:
    if not isinstance(value, str):
        return ""
    lowered = {o.lower(): o for o in options}
    close = difflib.get_close_matches(value.lower(), list(lowered), n=1, cutoff=0.5)
    return f"; did you mean {lowered[close[0]]!r}?" if close else ""


def _expected(kind: str) -> str:
    base = kind.removesuffix("_type").removesuffix("_parsing")
    return {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string", "list": "a list",
            "dict": "a table", "model": "a table", "model_attributes": "a table"}.get(base, base)


# ----- checks that need the filesystem or installed packages -----------------------------------------
def check_environment(config: TrainConfig) -> list[str]:
    """Paths that must exist and packages that must be installed; no model is loaded."""
    problems: list[str] = []
    ds = config.dataset
    generated = ds.generate is not None
    if ds.train_data_dir and not generated and not Path(ds.train_data_dir).is_dir():
        problems.append(f"dataset.train_data_dir: folder {ds.train_data_dir} does not exist")
    if ds.reg_data_dir and not Path(ds.reg_data_dir).is_dir():
        problems.append(f"dataset.reg_data_dir: folder {ds.reg_data_dir} does not exist")
    for i, subset in enumerate(ds.subsets):
        if not Path(subset.image_dir).is_dir():
            problems.append(f"dataset.subsets[{i}].image_dir: folder {subset.image_dir} does not exist")
    if config.network.weights and not Path(config.network.weights).is_file():
        problems.append(f"network.weights: file {config.network.weights} does not exist")
    problems += _check_model(config)
    package = _OPTIONAL_PACKAGES.get(config.optimizer.type)
    if package and not _installed(package):
        problems.append(f"optimizer.type: {config.optimizer.type} needs the {_PIP_NAMES[package]} package (pip install {_PIP_NAMES[package]}); or use AdamW")
    if config.training.attention == "xformers" and not _installed("xformers"):
        problems.append("training.attention: xformers is not installed (pip install xformers); use 'sdpa'")
    if "wandb" in config.logging.trackers and not _installed("wandb"):
        problems.append("logging.trackers: wandb is not installed (pip install wandb)")
    if "tensorboard" in config.logging.trackers and not (_installed("tensorboard") or _installed("tensorboardX")):
        problems.append("logging.trackers: tensorboard is not installed (pip install tensorboard), or set trackers = []")
    return problems


def _check_model(config: TrainConfig) -> list[str]:
    from pipelines.models import ModelLoadError, resolve_model_path

    problems = []
    for field, value in (("model.path", config.model.path), ("model.config_dir", config.model.config_dir)):
        if value is None:
            continue
        try:
            resolve_model_path(value)
        except ModelLoadError as err:
            problems.append(f"{field}: {err}")
    return problems


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# ----- printing --------------------------------------------------------------------------------------
def dump_toml(config: TrainConfig) -> str:
    """The resolved config as TOML (unset optional keys are shown as comments)."""
    data = config.model_dump(mode="json")
    lines: list[str] = []
    for section, values in data.items():
        _dump_table(lines, section, values)
    return "\n".join(lines).strip() + "\n"


def _dump_table(lines: list[str], name: str, values: dict[str, Any]) -> None:
    lines.append(f"[{name}]")
    nested: list[tuple[str, list]] = []
    for key, value in values.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            nested.append((key, value))
        elif value is None:
            lines.append(f"# {key} = (unset)")
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    lines.append("")
    for key, tables in nested:
        for table in tables:
            lines.append(f"[[{name}.{key}]]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None and v != [])
            lines.append("")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = [f"{k} = {_toml_value(v)}" for k, v in value.items() if v is not None]
        return "{ " + ", ".join(items) + " }" if items else "{}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")
