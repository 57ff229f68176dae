"""What the tabs share: the path policy, the training job, and the generation engine.

`GenerationEngine` keeps ONE base pipeline in memory (the last one asked for) with an `AdapterStack`
bound to it. Each browser session owns its list of adapters (name, file, strengths); before a
generation the engine brings the stack in line with that list: files not loaded yet are loaded
(again only when the file changed on disk), the others only get their strengths and enable flags
set, so moving a slider and regenerating never reloads the model or an adapter file. Every use of
the pipeline holds the engine's lock (the Gradio events that use it also share one concurrency
group), so two sessions never interleave on it.
"""
from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

from .jobs import TrainingJob
from .paths import PathPolicy


@dataclass(frozen=True)
class AdapterRow:
    """One adapter of a session's stack, with the settings its UI slot shows."""

    name: str
    path: str
    enabled: bool = True
    strength: float = 1.0
    separate: bool = False
    unet: float = 1.0
    text_encoder: float = 1.0

    def strengths(self) -> tuple[float, float]:
        """(UNet, text encoder)."""
        return (self.unet, self.text_encoder) if self.separate else (self.strength, self.strength)


@dataclass
class _Loaded:
    path: str
    stamp: tuple[int, int]


@dataclass
class GenerationEngine:
    policy: PathPolicy
    loader: Callable[[str], Any] | None = None  # model id -> pipeline (tests may swap it)
    stats: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.lock = threading.RLock()
        self.model: str | None = None
        self.pipe: Any = None
        self.stack: Any = None
        self._loaded: dict[str, _Loaded] = {}
        self._hashes: dict[str, str | None] = {}

    # ----- model --------------------------------------------------------------------------------------
    def ensure_model(self, model: str) -> Any:
        """The pipeline of `model` (loaded once; another model replaces it)."""
        from pipelines.stack import AdapterStack

        with self.lock:
            if self.model != model or self.pipe is None:
                self.pipe = self.stack = None
                self._loaded.clear()
                self.pipe = (self.loader or _load_pipeline)(model)
                self.stack = AdapterStack(self.pipe)
                self.model = model
                self.stats["model_loads"] += 1
            return self.pipe

    # ----- adapters ------------------------------------------------------------------------------------
    def load_adapter(self, model: str, name: str, path: str) -> Any:
        """Load (or reuse) adapter `name` from `path` on `model`; returns its AdapterInfo."""
        with self.lock:
            self.ensure_model(model)
            stamp = _stamp(path)
            current = self._loaded.get(name)
            if name in self.stack and current is not None and current.path == path and current.stamp == stamp:
                return self.stack.info(name)
            if name in self.stack:
                self.stack.remove(name)
            self._loaded.pop(name, None)
            info = self.stack.add(name, path)
            self._loaded[name] = _Loaded(path, stamp)
            self.stats["adapter_loads"] += 1
            return info

    def sync(self, model: str, rows: Sequence[AdapterRow]) -> None:
        """Make the stack hold exactly `rows` (plus adapters prompt tags loaded) with their settings."""
        from pipelines.stack import AdapterSettings

        with self.lock:
            self.ensure_model(model)
            wanted = {row.name for row in rows}
            for name in list(self.stack.names):
                if name not in wanted and self.stack.origin(name) != "prompt":
                    self.stack.remove(name)
                    self._loaded.pop(name, None)
            for row in rows:
                if name_in_stack_from_prompt(self.stack, row.name):
                    self.stack.remove(row.name)
                self.load_adapter(model, row.name, row.path)
                unet, te = row.strengths()
                wanted_settings = AdapterSettings(unet=unet, text_encoder=te, enabled=row.enabled)
                if self.stack.settings(row.name) != wanted_settings:
                    self.stack.configure(row.name, wanted_settings)

    # ----- generation ------------------------------------------------------------------------------------
    def generate(self, model: str, rows: Sequence[AdapterRow], settings: Any, *, out_dir: Path,
                 progress: Callable[[int], None] | None = None) -> tuple[list[Path], list[str]]:
        """Generate with the session's stack; PNGs (with A1111 `parameters`) are written to `out_dir`."""
        from pipelines.generate import generate, model_display_name
        from pipelines.png_info import format_parameters, save_png
        from pipelines.prompt_tags import AdapterLibrary

        with self.lock:
            self.sync(model, rows)
            library = AdapterLibrary(self.policy.adapters)
            result = generate(self.pipe, settings, stack=self.stack, library=library, model_name=model_display_name(model),
                              model_hash=self._model_hash(model), progress=progress)
            self.stats["generations"] += 1
        out_dir.mkdir(parents=True, exist_ok=True)
        first = next_index(out_dir)
        paths, texts = [], []
        for offset, (image, params) in enumerate(zip(result.images, result.parameters)):
            text = format_parameters(params)
            paths.append(save_png(image, out_dir / f"{first + offset:05d}-{params.seed}.png", parameters=text))
            texts.append(text)
        return paths, texts

    def _model_hash(self, model: str) -> str | None:
        from pipelines.generate import model_short_hash

        if model not in self._hashes:
            try:
                self._hashes[model] = model_short_hash(model)
            except Exception:  # a hash is a nicety; never fail a generation for it
                self._hashes[model] = None
        return self._hashes[model]


def name_in_stack_from_prompt(stack: Any, name: str) -> bool:
    return name in stack and stack.origin(name) == "prompt"


def next_index(folder: Path) -> int:
    numbers = [int(p.name[:5]) for p in folder.glob("[0-9][0-9][0-9][0-9][0-9]-*.png")]
    return max(numbers, default=-1) + 1


def output_folder(policy: PathPolicy) -> Path:
    return policy.work / "outputs" / datetime.now().strftime("%Y-%m-%d")


def _stamp(path: str) -> tuple[int, int]:
    stat = Path(path).stat()
    return stat.st_mtime_ns, stat.st_size


def _load_pipeline(model: str) -> Any:
    from pipelines.models import load_pipeline

    return load_pipeline(model)


@dataclass
class UIContext:
    """Everything a tab needs."""

    policy: PathPolicy
    job: TrainingJob
    engine: GenerationEngine
    python: str = ""
    refresh_s: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)
