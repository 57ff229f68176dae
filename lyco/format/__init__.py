"""Adapter files: community key forms, metadata, hashes, validation, atomic writes."""
from .adapter_file import AdapterFile, ModuleEntry, load_adapter_file, parse_adapter
from .container import AdapterFileError, read_tensors
from .load import LoadResult, load_network
from .metadata import BaseModelInfo, build_metadata
from .save import save_network

__all__ = [
    "AdapterFile", "AdapterFileError", "BaseModelInfo", "LoadResult", "ModuleEntry", "build_metadata",
    "load_adapter_file", "load_network", "parse_adapter", "read_tensors", "save_network",
]
