"""lyco: low-rank adapters (LoRA/LoCon, LoHa, LoKr, DoRA) for Stable Diffusion, with community-compatible files.

The core depends on torch and safetensors only.
"""
from .format import AdapterFile, AdapterFileError, BaseModelInfo, load_adapter_file, load_network, save_network
from .layer import LycoLayer
from .network import LycoNetwork, detect_family
from .settings import NetworkConfig
from .targets import PRESETS, ModuleOverride

__version__ = "0.1.0"

__all__ = [
    "AdapterFile", "AdapterFileError", "BaseModelInfo", "LycoLayer", "LycoNetwork", "ModuleOverride", "NetworkConfig",
    "PRESETS", "detect_family", "load_adapter_file", "load_network", "save_network",
]
