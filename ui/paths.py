"""The folders the UI may read and write, and the check every path from the browser goes through.

A path typed or picked in the browser is never opened as given: `PathPolicy.resolve` makes it
absolute (relative paths are taken inside the folder the field is about), follows symlinks and `..`,
and refuses it unless the result lies inside one of the configured folders. Model fields also accept
`builtin:*` names and hub ids (`org/name`), which are not paths. Uploads are accepted only from
Gradio's own upload folder.
"""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

Role = Literal["work", "adapters", "data", "models"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SAFE_NAME = re.compile(r"^[\w][\w.+ -]*$")


class PathNotAllowed(ValueError):
    """A path outside the configured folders (or a name that is not a plain file name)."""


@dataclass(frozen=True)
class PathPolicy:
    """Absolute, resolved roots per role. `work`, `adapters` and `data` are writable; `models` is read-only."""

    work: Path
    adapters: Path
    data: Path
    models: tuple[Path, ...] = ()
    uploads: tuple[Path, ...] = field(default_factory=lambda: (gradio_upload_dir(),))

    @classmethod
    def create(cls, *, workdir: str | os.PathLike, adapter_dir: str | os.PathLike | None = None,
               data_dir: str | os.PathLike | None = None, model_dirs: Iterable[str | os.PathLike] = ()) -> "PathPolicy":
        """Make the folders (adapter and data folders default to `<workdir>/adapters` and `<workdir>/data`)."""
        work = _real(workdir)
        adapters = _real(adapter_dir) if adapter_dir else work / "adapters"
        data = _real(data_dir) if data_dir else work / "data"
        for folder in (work, adapters, data):
            folder.mkdir(parents=True, exist_ok=True)
        return cls(work, adapters, data, tuple(_real(m) for m in model_dirs))

    # ----- roots ---------------------------------------------------------------------------------------
    def roots(self, role: Role | None = None) -> tuple[Path, ...]:
        table = {"work": (self.work,), "adapters": (self.adapters,), "data": (self.data,), "models": self.models}
        if role is not None:
            return table[role]
        return tuple(dict.fromkeys((self.work, self.adapters, self.data, *self.models)))

    def readable(self) -> tuple[Path, ...]:
        return self.roots()

    def writable(self) -> tuple[Path, ...]:
        return tuple(dict.fromkeys((self.work, self.adapters, self.data)))

    def describe(self) -> str:
        lines = [f"work folder: {self.work}", f"adapter folder: {self.adapters}", f"data folder: {self.data}"]
        lines += [f"model folder: {m}" for m in self.models]
        return "\n".join(lines)

    # ----- checks ------------------------------------------------------------------------------------
    def resolve(self, text: str | os.PathLike, *, base: Role = "work", write: bool = False, what: str = "path",
                must_exist: bool = False, kind: Literal["file", "dir", None] = None) -> Path:
        """`text` as an absolute, resolved path inside the allowed folders; PathNotAllowed otherwise.

        Relative paths are taken inside the `base` folder."""
        raw = os.fspath(text).strip()
        if not raw:
            raise PathNotAllowed(f"{what}: no path given")
        if "\x00" in raw:
            raise PathNotAllowed(f"{what}: invalid path")
        candidate = Path(raw).expanduser()
        if not candidate.is_absolute():
            candidate = self.roots(base)[0] / candidate if self.roots(base) else self.work / candidate
        resolved = _real(candidate)
        allowed = self.writable() if write else self.readable()
        if not any(_inside(resolved, root) for root in allowed):
            kind_text = "written" if write else "read"
            roots = ", ".join(str(r) for r in allowed)
            raise PathNotAllowed(f"{what}: {raw} is outside the folders this UI may {kind_text} ({roots}); "
                                 "move it there or start lyco-ui with --workdir/--adapter-dir/--data-dir/--model-dir")
        if must_exist and not resolved.exists():
            raise PathNotAllowed(f"{what}: {resolved} does not exist")
        if kind == "file" and resolved.exists() and not resolved.is_file():
            raise PathNotAllowed(f"{what}: {resolved} is not a file")
        if kind == "dir" and resolved.exists() and not resolved.is_dir():
            raise PathNotAllowed(f"{what}: {resolved} is not a folder")
        return resolved

    def model(self, text: str) -> str:
        """A model argument: `builtin:*` and hub ids pass as they are; local paths must be readable."""
        value = (text or "").strip()
        if not value:
            raise PathNotAllowed("base model: none given (pick builtin:tiny-sd, a folder or file in a model folder, or a hub id)")
        if value.startswith("builtin:"):
            return value
        candidate = Path(value).expanduser()
        if _HUB_ID.match(value) and not candidate.is_absolute():
            # `org/name` is a hub id unless such a folder exists where a loader would look (its cwd, the work folder)
            local = [p for p in (Path.cwd() / candidate, self.work / candidate) if p.exists()]
            if not local:
                return value
            candidate = local[0]
        base: Role = "models" if self.models else "work"
        return str(self.resolve(candidate, base=base, what="base model", must_exist=True))

    def uploaded(self, text: str | os.PathLike) -> Path:
        """A file Gradio received from the browser (it lives in Gradio's upload folder)."""
        resolved = _real(text)
        if not any(_inside(resolved, root) for root in self.uploads) or not resolved.is_file():
            raise PathNotAllowed(f"upload: {text} is not a file uploaded through this UI")
        return resolved

    def output_file(self, name: str, *, role: Role = "adapters", suffix: str = ".safetensors", what: str = "output name") -> Path:
        """A new file named `name` (a plain file name, no folders) in the `role` folder."""
        stem = (name or "").strip()
        if suffix and stem.endswith(suffix):
            stem = stem[: -len(suffix)]
        if not _SAFE_NAME.match(stem) or stem in (".", ".."):
            raise PathNotAllowed(f"{what}: {name!r} is not a plain file name (letters, digits, _ . + - and spaces; no folders)")
        return self.resolve(stem + suffix, base=role, write=True, what=what)


def safe_name(text: str, *, default: str = "lyco") -> str:
    """`text` reduced to a plain file-name stem."""
    cleaned = re.sub(r"[^\w.+-]+", "_", (text or "").strip()).strip("._")
    return cleaned or default


def gradio_upload_dir() -> Path:
    """Where Gradio stores uploads (GRADIO_TEMP_DIR, else <tmp>/gradio)."""
    try:
        from gradio.utils import get_upload_folder

        return _real(get_upload_folder())
    except ImportError:
        return _real(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)
