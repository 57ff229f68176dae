"""Base-model loading: builtin tiny models, diffusers folders, hub ids and single-file checkpoints.

Model arguments accepted everywhere in lyco:

* ``builtin:tiny-sd`` / ``builtin:tiny-sd2`` / ``builtin:tiny-sdxl`` - folders shipped in the package;
* a local diffusers folder (has ``model_index.json``) - ``from_pretrained``;
* a hub id such as ``org/name`` - ``from_pretrained`` (needs the network or the local HF cache);
* a single ``.safetensors`` / ``.ckpt`` / ``.pt`` / ``.bin`` file - ``from_single_file``; pass ``config_dir``
  (a local diffusers folder of the same architecture, or a builtin name) when the hub is unreachable.

Family detection rule (`describe_pipeline`), from the loaded components only:

1. ``sdxl`` if the pipeline has a second text encoder or the UNet's
   ``addition_embed_type`` is ``"text_time"``;
2. ``sd2`` if the UNet's ``cross_attention_dim`` is 1024 (OpenCLIP-H, the real SD2), or the UNet
   uses linear attention projections (``use_linear_projection=True``) *and* the text encoder is
   OpenCLIP-like (``hidden_act == "gelu"``; OpenAI CLIP, used by SD1, has ``"quick_gelu"``);
3. ``sd1`` otherwise.

The prediction type (``epsilon`` / ``v_prediction``) is read from the scheduler config; it is not
used to pick the family because SD2-base is epsilon and some SD1 fine-tunes are v-prediction.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from pipelines.builtin import BUILTIN_DIR

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS: tuple[str, ...] = ("tiny-sd", "tiny-sd2", "tiny-sdxl")
SINGLE_FILE_SUFFIXES: tuple[str, ...] = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
FAMILIES: tuple[str, ...] = ("sd1", "sd2", "sdxl")

Pipeline = Union[StableDiffusionPipeline, StableDiffusionXLPipeline]
PathLike = Union[str, os.PathLike]

try:  # diffusers >= 0.36 renamed torch_dtype to dtype and warns on the old name
    from diffusers.utils.deprecation_utils import _TORCH_DTYPE_DEPRECATION_MESSAGE  # noqa: F401

    _DTYPE_KW = "dtype"
except ImportError:
    _DTYPE_KW = "torch_dtype"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PIPELINE_CLASSES: dict[str, type] = {
    "StableDiffusionPipeline": StableDiffusionPipeline,
    "StableDiffusionXLPipeline": StableDiffusionXLPipeline,
}


class ModelLoadError(RuntimeError):
    """A model argument that cannot be loaded; the message says what to do instead."""


@dataclass(frozen=True)
class ModelInfo:
    """What lyco needs to know about a loaded base model."""

    family: str  # "sd1" | "sd2" | "sdxl"
    prediction_type: str  # "epsilon" | "v_prediction" (or "sample")
    pipeline_class: str
    cross_attention_dim: int
    text_encoder_hidden_sizes: tuple[int, ...]
    use_linear_projection: bool
    layers_per_block: int
    down_block_types: tuple[str, ...]
    latent_channels: int
    vae_scale_factor: int
    resolution: int  # default image side in pixels: UNet sample_size * vae_scale_factor


def builtin_names() -> list[str]:
    """The accepted builtin model arguments, e.g. ``builtin:tiny-sd``."""
    return [BUILTIN_PREFIX + name for name in BUILTIN_MODELS]


def _is_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def resolve_model_path(name: PathLike) -> Union[Path, str]:
    """Turn a model argument into a local `Path` (folder or file) or a hub id string.

    Raises `ModelLoadError` with the offending path for unknown builtins and missing paths.
    """
    text = os.fspath(name)
    if text.startswith(BUILTIN_PREFIX):
        model = text[len(BUILTIN_PREFIX):]
        if model not in BUILTIN_MODELS:
            raise ModelLoadError(f"unknown builtin model {text!r}; choose one of: {', '.join(builtin_names())}")
        folder = BUILTIN_DIR / model
        if not (folder / "model_index.json").is_file():
            raise ModelLoadError(
                f"builtin model {text!r} is missing its weights at {folder}; reinstall lyco, or regenerate "
                f"them with `python -m pipelines.builtin.pretrain --out {folder}` (tiny-sd) or "
                f"`python -m pipelines.builtin.architectures --out {BUILTIN_DIR} {model}`"
            )
        return folder
    path = Path(text).expanduser()
    if path.exists():
        return path
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        raise ModelLoadError(f"checkpoint file {path} does not exist; check the path (relative to {Path.cwd()})")
    if _HUB_ID.match(text) and not text.startswith("."):
        return text
    raise ModelLoadError(
        f"model path {path} does not exist. Pass a diffusers folder (with model_index.json), a "
        f".safetensors/.ckpt file, a hub id like 'org/name', or one of {', '.join(builtin_names())}"
    )


def _pipeline_class(class_name: Optional[str], where: str) -> type:
    if class_name in _PIPELINE_CLASSES:
        return _PIPELINE_CLASSES[class_name]
    raise ModelLoadError(
        f"{where} is a {class_name or 'unknown'} pipeline; lyco supports "
        f"{', '.join(_PIPELINE_CLASSES)} (SD1.x, SD2.x, SDXL)"
    )


def _read_model_index(folder: Path) -> dict[str, Any]:
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(
            f"{folder} has no model_index.json, so it is not a diffusers pipeline folder. Pass the folder "
            f"that contains model_index.json, or a single .safetensors/.ckpt file inside it"
        )
    return json.loads(index.read_text(encoding="utf-8"))


def _extra_kwargs(cls: type) -> dict[str, Any]:
    # lyco trains and samples adapters; the SD1/SD2 safety checker is a separate 1.2 GB model.
    if cls is StableDiffusionPipeline:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    return {}


def _single_file_class(path: Path) -> type:
    """Guess SD vs SDXL from a checkpoint's key names (SDXL has a second conditioner embedder)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        keys = list(state.get("state_dict", state).keys())
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return StableDiffusionXLPipeline
    return StableDiffusionPipeline


def _load_single_file(path: Path, *, dtype: torch.dtype, config_dir: Optional[PathLike]) -> Pipeline:
    config_path: Optional[Path] = None
    if config_dir is not None:
        resolved = resolve_model_path(config_dir)
        if not isinstance(resolved, Path) or not resolved.is_dir():
            raise ModelLoadError(f"config_dir {config_dir} must be a local diffusers folder or a builtin name")
        config_path = resolved
        cls = _pipeline_class(_read_model_index(config_path).get("_class_name"), str(config_path))
    else:
        if _is_offline():
            raise ModelLoadError(
                f"cannot load single-file checkpoint {path} without a config: the hub is unreachable "
                f"(HF_HUB_OFFLINE). Pass config_dir (--config-dir) = a local diffusers folder of the same "
                f"architecture (model_index.json + component configs), e.g. a downloaded copy of the "
                f"base model's repo, or {', '.join(builtin_names())} for checkpoints of the tiny models"
            )
        cls = _single_file_class(path)
    kwargs: dict[str, Any] = {_DTYPE_KW: dtype, **_extra_kwargs(cls)}
    if config_path is not None:
        kwargs.update(config=str(config_path), local_files_only=True)
    try:
        return cls.from_single_file(str(path), **kwargs)
    except Exception as exc:  # diffusers raises many types; keep the cause, add the fix
        hint = (
            f"check that {config_path} has the same architecture as the checkpoint"
            if config_path is not None
            else "pass config_dir (--config-dir) = a local diffusers folder of the same architecture"
        )
        raise ModelLoadError(f"could not load single-file checkpoint {path}: {exc}; {hint}") from exc


def load_pipeline(
    model: PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    config_dir: Optional[PathLike] = None,
    variant: Optional[str] = None,
) -> Pipeline:
    """Load a StableDiffusionPipeline / StableDiffusionXLPipeline from any model argument.

    See the module docstring for the accepted forms. `config_dir` is only used for single-file
    checkpoints. The SD1/SD2 safety checker is not loaded. Raises `ModelLoadError` with the
    path and a fix when the model cannot be loaded.
    """
    resolved = resolve_model_path(model)
    if isinstance(resolved, Path) and resolved.is_file():
        if resolved.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ModelLoadError(
                f"{resolved} is a file but not a checkpoint ({', '.join(SINGLE_FILE_SUFFIXES)}); pass the "
                f"checkpoint file or the diffusers folder"
            )
        pipe = _load_single_file(resolved, dtype=dtype, config_dir=config_dir)
    elif isinstance(resolved, Path):
        cls = _pipeline_class(_read_model_index(resolved).get("_class_name"), str(resolved))
        try:
            pipe = cls.from_pretrained(
                str(resolved), local_files_only=True, variant=variant, **{_DTYPE_KW: dtype}, **_extra_kwargs(cls)
            )
        except Exception as exc:
            raise ModelLoadError(f"could not load the diffusers folder {resolved}: {exc}") from exc
    else:
        try:
            index = DiffusionPipeline.load_config(resolved)
            cls = _pipeline_class(index.get("_class_name"), resolved)
            pipe = cls.from_pretrained(resolved, variant=variant, **{_DTYPE_KW: dtype}, **_extra_kwargs(cls))
        except ModelLoadError:
            raise
        except Exception as exc:
            offline = " The hub is unreachable here (HF_HUB_OFFLINE)." if _is_offline() else ""
            raise ModelLoadError(
                f"could not load hub model {resolved!r}: {exc}.{offline} Download it where the network is "
                f"available and pass the local folder instead"
            ) from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def detect_family(pipe: Any) -> str:
    """``"sd1"``, ``"sd2"`` or ``"sdxl"`` by the rule in the module docstring."""
    unet_config = pipe.unet.config
    if getattr(pipe, "text_encoder_2", None) is not None or unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    cross_dim = unet_config.get("cross_attention_dim")
    if isinstance(cross_dim, (list, tuple)):
        cross_dim = cross_dim[0]
    text_encoder = getattr(pipe, "text_encoder", None)
    hidden_act = getattr(getattr(text_encoder, "config", None), "hidden_act", None)
    if cross_dim == 1024 or (unet_config.get("use_linear_projection") and hidden_act == "gelu"):
        return "sd2"
    return "sd1"


def describe_pipeline(pipe: Any) -> ModelInfo:
    """Family, prediction type and shapes of a loaded pipeline (see the module docstring)."""
    unet_config = pipe.unet.config
    cross_dim = unet_config.get("cross_attention_dim")
    if isinstance(cross_dim, (list, tuple)):
        cross_dim = cross_dim[0]
    hidden = tuple(
        int(encoder.config.hidden_size)
        for encoder in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None))
        if encoder is not None
    )
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return ModelInfo(
        family=detect_family(pipe),
        prediction_type=str(pipe.scheduler.config.get("prediction_type", "epsilon")),
        pipeline_class=type(pipe).__name__,
        cross_attention_dim=int(cross_dim),
        text_encoder_hidden_sizes=hidden,
        use_linear_projection=bool(unet_config.get("use_linear_projection", False)),
        layers_per_block=int(unet_config.get("layers_per_block")),
        down_block_types=tuple(unet_config.get("down_block_types")),
        latent_channels=int(pipe.vae.config.latent_channels),
        vae_scale_factor=vae_scale,
        resolution=int(unet_config.get("sample_size")) * vae_scale,
    )
