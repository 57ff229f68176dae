"""Builtin tiny Stable Diffusion models shipped inside the package (see README.md here)."""

from pathlib import Path

BUILTIN_DIR = Path(__file__).resolve().parent
