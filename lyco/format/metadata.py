"""Metadata written with adapters: sd-scripts `ss_*` keys, ModelSpec keys and hashes (FORMAT.md §3)."""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Mapping

from ..network import LycoNetwork

MODELSPEC_VERSION = "1.0.1"
_BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
_DEFAULT_RESOLUTION = {"sd1": "512x512", "sd2": "512x512", "sdxl": "1024x1024"}
_SGM_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"


@dataclass(frozen=True)
class BaseModelInfo:
    """What the adapter was trained on, as far as metadata readers (A1111's version filter) care."""

    family: str = "sd1"
    v_prediction: bool = False
    resolution: str | None = None
    model_name: str | None = None


def base_model_version(info: BaseModelInfo) -> str:
    """sd-scripts `get_model_version_str_for_sd1_sd2`: `_v` is appended for v-prediction on SD1 and SD2 alike."""
    version = _BASE_VERSION[info.family]
    return version + "_v" if info.v_prediction and info.family != "sdxl" else version


def default_resolution(info: BaseModelInfo) -> str:
    """sd-scripts `sai_model_spec`: 1024 for SDXL, 768 for SD2 with v-prediction, else 512."""
    if info.family == "sd2" and info.v_prediction:
        return "768x768"
    return _DEFAULT_RESOLUTION[info.family]


def architecture(info: BaseModelInfo) -> str:
    if info.family == "sdxl":
        return "stable-diffusion-xl-v1-base/lora"
    if info.family == "sd2":
        return "stable-diffusion-v2-768-v/lora" if info.v_prediction else "stable-diffusion-v2-512/lora"
    return "stable-diffusion-v1/lora"


def network_module_name(network: LycoNetwork) -> str:
    """`networks.lora` when sd-scripts' own loader can read every module (plain LoRA/LoCon), else `lycoris.kohya`."""
    plain = all(layer.algo.NAME == "lora" and layer.dora_scale is None and "lora_mid.weight" not in layer.param_keys
                for layer in network.layers.values())
    return "networks.lora" if plain else "lycoris.kohya"


def network_args(network: LycoNetwork) -> dict[str, str]:
    if network.config is not None:
        return network.config.as_network_args()
    algos = Counter(layer.algo.NAME for layer in network.layers.values())
    return {"algo": algos.most_common(1)[0][0]}


def build_metadata(
    network: LycoNetwork,
    *,
    base: BaseModelInfo | None = None,
    title: str | None = None,
    extra: Mapping[str, object] | None = None,
) -> dict[str, str]:
    """String metadata for a network; `extra` (e.g. the trainer's ss_* keys) is added with str()/json."""
    base = base or BaseModelInfo(family=network.family)
    ranks = Counter(layer.rank for layer in network.layers.values() if layer.rank is not None)
    if not ranks:  # only LoKr modules with two full factors (no rank): LyCORIS writes the configured dim
        ranks = Counter([network.config.rank if network.config else int(float(next(iter(network.layers.values())).alpha))])
    alphas = Counter(float(layer.alpha) for layer in network.layers.values())
    module = network_module_name(network)
    args = network_args(network)
    title = title or f"LoRA@{int(time.time())}"
    metadata: dict[str, str] = {
        "ss_network_module": module,
        "ss_network_dim": str(ranks.most_common(1)[0][0]),
        "ss_network_alpha": _number(alphas.most_common(1)[0][0]),
        "ss_v2": str(base.family == "sd2"),
        "ss_base_model_version": base_model_version(base),
        "ss_output_name": title,
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": architecture(base),
        "modelspec.implementation": _SGM_IMPLEMENTATION if base.family == "sdxl" else "diffusers",
        "modelspec.title": title,
        "modelspec.resolution": base.resolution or default_resolution(base),
        "modelspec.date": datetime.now().replace(microsecond=0).isoformat(),
        "modelspec.prediction_type": "v" if base.v_prediction else "epsilon",
    }
    if module != "networks.lora" or set(args) - {"algo", "preset"}:
        metadata["ss_network_args"] = json.dumps(args)
    if base.model_name:
        metadata["ss_sd_model_name"] = base.model_name
    for key, value in (extra or {}).items():
        metadata[key] = value if isinstance(value, str) else (json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    return metadata


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
