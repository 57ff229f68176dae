"""One code path for "model + adapters -> images": the CLI, the UI and the trainer's samples all call `generate`.

    stack = AdapterStack(pipe)
    stack.add("style", "style.safetensors", strength=0.8)          # or an in-memory LycoNetwork (trainer)
    result = generate(pipe, GenerationSettings(prompt="a cat <lora:ink:0.5>", seeds=(1, 2)),
                      stack=stack, library=AdapterLibrary("loras/"))
    result.images, result.parameters  # PIL images + ImageParameters (A1111 infotext via png_info)

Prompt tags are parsed here: tagged adapters are loaded from the library into the stack (once; they
stay cached, disabled, between prompts) and applied only for this call; the stack's other settings are
restored afterwards. Each image has its own CPU generator seeded with its seed, so an image depends on
its seed only (not on its position in a batch, up to float rounding of batched kernels).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from PIL import Image
from torch import nn

from . import prompt_tags
from .png_info import ImageParameters, format_parameters
from .stack import AdapterSettings, AdapterStack

LOG = logging.getLogger(__name__)
VERSION = "lyco 0.1.0"


@dataclass(frozen=True)
class SchedulerChoice:
    """A diffusers scheduler class and the A1111 sampler name (and schedule type) it stands for."""

    sampler: str
    class_name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    schedule_type: str | None = None


SCHEDULERS: Mapping[str, SchedulerChoice] = {
    "ddim": SchedulerChoice("DDIM", "DDIMScheduler"),
    "euler": SchedulerChoice("Euler", "EulerDiscreteScheduler"),
    "euler_a": SchedulerChoice("Euler a", "EulerAncestralDiscreteScheduler"),
    "dpmpp_2m": SchedulerChoice("DPM++ 2M", "DPMSolverMultistepScheduler"),
    "dpmpp_2m_karras": SchedulerChoice("DPM++ 2M", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "Karras"),
    "unipc": SchedulerChoice("UniPC", "UniPCMultistepScheduler"),
    "pndm": SchedulerChoice("PLMS", "PNDMScheduler"),
    "lms": SchedulerChoice("LMS", "LMSDiscreteScheduler"),
    "heun": SchedulerChoice("Heun", "HeunDiscreteScheduler"),
    "ddpm": SchedulerChoice("DDPM", "DDPMScheduler"),
}


class GenerationError(ValueError):
    """Settings that cannot be generated; the message says which one and how to fix it."""


@dataclass(frozen=True)
class GenerationSettings:
    prompt: str
    negative_prompt: str = ""
    seeds: tuple[int, ...] = (0,)
    steps: int = 20
    guidance_scale: float = 7.0
    width: int | None = None  # None: the model's default size
    height: int | None = None
    scheduler: str | None = None  # a key of SCHEDULERS; None keeps the pipeline's scheduler
    batch_size: int = 1


@dataclass
class GenerationResult:
    images: list[Image.Image]
    parameters: list[ImageParameters]

    @property
    def infotexts(self) -> list[str]:
        return [format_parameters(p) for p in self.parameters]


def scheduler_key(sampler: str, schedule_type: str | None = None) -> str | None:
    """The SCHEDULERS key for an A1111 sampler name (+ schedule type), e.g. ("DPM++ 2M", "Karras")."""
    for key, choice in SCHEDULERS.items():
        if choice.sampler == sampler and (choice.schedule_type or None) == (schedule_type if schedule_type != "Automatic" else None):
            return key
    return None


def describe_scheduler(scheduler: Any) -> tuple[str, str | None]:
    """(A1111 sampler name, schedule type) of a scheduler instance; the class name when unknown."""
    karras = bool(getattr(scheduler.config, "use_karras_sigmas", False))
    for choice in SCHEDULERS.values():
        if choice.class_name == type(scheduler).__name__ and bool(choice.options.get("use_karras_sigmas", False)) == karras:
            return choice.sampler, choice.schedule_type
    return type(scheduler).__name__, None


def make_scheduler(key: str, config: Mapping[str, Any]) -> Any:
    import diffusers

    if key not in SCHEDULERS:
        raise GenerationError(f"unknown scheduler {key!r}; choose one of {', '.join(SCHEDULERS)}")
    choice = SCHEDULERS[key]
    return getattr(diffusers, choice.class_name).from_config(config, **choice.options)


def model_short_hash(model: str | Path) -> str | None:
    """A1111's ``Model hash`` (10 hex of sha256) for a single-file checkpoint; for a diffusers folder
    (builtin models included) the sha256 of its weight files' sha256s in path order (lyco's convention,
    A1111 has none); None for hub ids."""
    from .models import resolve_model_path

    resolved = resolve_model_path(model)
    if not isinstance(resolved, Path):
        return None
    if resolved.is_file():
        return _file_sha256(resolved)[:10]
    files = sorted(f for f in resolved.rglob("*") if f.suffix in (".safetensors", ".bin") and f.is_file())
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(resolved).as_posix()}:{_file_sha256(file)}\n".encode())
    return digest.hexdigest()[:10]


def model_display_name(model: str | Path) -> str:
    text = str(model)
    if text.startswith("builtin:"):
        return text.split(":", 1)[1]
    path = Path(text)
    return path.stem if path.suffix else (path.name or text)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----- generation ------------------------------------------------------------------------------------
def generate(
    pipe: Any,
    settings: GenerationSettings,
    *,
    stack: AdapterStack | None = None,
    library: prompt_tags.AdapterLibrary | None = None,
    model_name: str | None = None,
    model_hash: str | None = None,
    progress: Callable[[int], None] | None = None,
    pipeline_kwargs: Mapping[str, Any] | None = None,
) -> GenerationResult:
    """Images for every seed of `settings`, with the stack's adapters and the prompt's tags applied.

    `pipeline_kwargs` go to the pipeline call unchanged (img2img/inpaint: image=, mask_image=,
    strength=). `progress` is called with 1 after every denoising step."""
    _validate(settings)
    prompt, tags = prompt_tags.parse_prompt(settings.prompt)
    negative = prompt_tags.strip_tags(settings.negative_prompt)
    if negative != settings.negative_prompt:
        LOG.warning("adapter tags in the negative prompt are ignored (as in A1111); put them in the prompt")
    if tags and stack is None:
        raise GenerationError("the prompt has adapter tags but no adapter stack was given")
    overrides = _tag_overrides(tags, stack, library) if stack is not None else {}
    width, height = _size(pipe, settings)
    with contextlib.ExitStack() as scope:
        if stack is not None:
            scope.enter_context(stack.overridden(overrides))
        sampler, schedule_type = describe_scheduler(scope.enter_context(_scheduler(pipe, settings.scheduler)))
        scope.enter_context(_eval_mode(pipe))
        if stack is not None:
            scope.enter_context(stack.inference())
        lora_hashes, lyco_adapters = _adapter_record(stack, set(overrides))
        images: list[Image.Image] = []
        for start in range(0, len(settings.seeds), settings.batch_size):
            seeds = settings.seeds[start:start + settings.batch_size]
            images += _run_batch(pipe, prompt, negative, seeds, settings, width, height, progress, pipeline_kwargs)
    parameters = [
        ImageParameters(
            prompt=settings.prompt, negative_prompt=settings.negative_prompt, steps=settings.steps, sampler=sampler,
            schedule_type=schedule_type, cfg_scale=settings.guidance_scale, seed=seed, width=width, height=height,
            model_hash=model_hash, model=model_name, lora_hashes=lora_hashes, lyco_adapters=lyco_adapters, version=VERSION,
        )
        for seed in settings.seeds
    ]
    return GenerationResult(images, parameters)


def _validate(settings: GenerationSettings) -> None:
    if not settings.seeds:
        raise GenerationError("no seeds given")
    if len(set(settings.seeds)) != len(settings.seeds):
        raise GenerationError(f"seeds repeat: {list(settings.seeds)}; each seed gives one image, so list each once")
    if settings.steps < 1:
        raise GenerationError(f"steps must be >= 1, got {settings.steps}")
    if settings.batch_size < 1:
        raise GenerationError(f"batch size must be >= 1, got {settings.batch_size}")
    if settings.scheduler is not None and settings.scheduler not in SCHEDULERS:
        raise GenerationError(f"unknown scheduler {settings.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")


def _size(pipe: Any, settings: GenerationSettings) -> tuple[int, int]:
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    default = int(pipe.unet.config.sample_size) * factor
    width, height = settings.width or default, settings.height or default
    for label, value in (("width", width), ("height", height)):
        if value < factor or value % factor:
            raise GenerationError(f"{label} {value} must be a positive multiple of {factor} (the VAE's downscale factor)")
    return width, height


def _tag_overrides(tags: Sequence[prompt_tags.AdapterTag], stack: AdapterStack, library: prompt_tags.AdapterLibrary | None) -> dict[str, AdapterSettings]:
    overrides: dict[str, AdapterSettings] = {}
    for tag in tags:
        if tag.name not in stack:
            if library is None:
                raise GenerationError(f"{tag.text}: no adapter {tag.name!r} is loaded and no adapter folder was given "
                                      f"(loaded: {', '.join(stack.names) or 'none'}); pass --adapter-dir / library=")
            stack.add(tag.name, library.resolve(tag.name), enabled=False, origin="prompt")
        overrides[tag.name] = AdapterSettings(unet=tag.unet, text_encoder=tag.te, block_weights=tag.lbw, enabled=True)
    for name in stack.names:
        if name not in overrides and stack.origin(name) == "prompt":
            overrides[name] = AdapterSettings(**{**stack.settings(name).__dict__, "enabled": False})
    return overrides


def _adapter_record(stack: AdapterStack | None, overridden: set[str]) -> tuple[dict[str, str], tuple[str, ...]]:
    """(Lora hashes of every enabled adapter, tags of the enabled adapters that did not come from the prompt)."""
    if stack is None:
        return {}, ()
    hashes: dict[str, str] = {}
    tags: list[str] = []
    for info in stack.list():
        if not info.settings.enabled:
            continue
        if info.short_hash:
            hashes[info.name] = info.short_hash
        if info.name not in overridden:
            s = info.settings
            tags.append(prompt_tags.format_tag(info.name, te=s.text_encoder, unet=s.unet, lbw=_lbw_tuple(s.block_weights)))
    return hashes, tuple(tags)


def _lbw_tuple(spec: Any) -> Any:
    return spec if spec is None or isinstance(spec, str) else tuple(float(v) for v in spec)


@contextlib.contextmanager
def _scheduler(pipe: Any, key: str | None) -> Iterator[Any]:
    original = pipe.scheduler
    if key is not None:
        pipe.scheduler = make_scheduler(key, original.config)
    try:
        yield pipe.scheduler
    finally:
        pipe.scheduler = original


@contextlib.contextmanager
def _eval_mode(pipe: Any) -> Iterator[None]:
    # One pass that touches only the modules in training mode: adapter chains make the tree several
    # times larger, and .eval() on every submodule would cost milliseconds per generation.
    modules = [m for name in ("unet", "text_encoder", "text_encoder_2", "vae") if isinstance(m := getattr(pipe, name, None), nn.Module)]
    switched = [sub for module in modules for sub in module.modules() if sub.training]
    for sub in switched:
        sub.training = False
    try:
        yield
    finally:
        for sub in switched:
            sub.training = True


def _run_batch(pipe: Any, prompt: str, negative: str, seeds: Sequence[int], settings: GenerationSettings, width: int,
               height: int, progress: Callable[[int], None] | None, pipeline_kwargs: Mapping[str, Any] | None) -> list[Image.Image]:
    generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]

    def on_step(_pipe: Any, _step: int, _timestep: Any, callback_kwargs: dict) -> dict:
        if progress is not None:
            progress(1)
        return callback_kwargs

    output = pipe(
        prompt=[prompt] * len(seeds),
        negative_prompt=[negative] * len(seeds),
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance_scale,
        width=width,
        height=height,
        generator=generators,
        output_type="pil",
        callback_on_step_end=on_step,
        **dict(pipeline_kwargs or {}),
    )
    return list(output.images)
