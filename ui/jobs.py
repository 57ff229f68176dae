"""One training job at a time, as a child process the UI starts, follows and stops.

* The child runs in its own session (process group); its state is always read from the process
  itself (`Popen.poll`), never from a flag the UI keeps, so the UI cannot show "running" for a dead
  process or "idle" for a live one.
* Stop sends SIGTERM to the trainer, which saves a resumable state and an adapter at the end of the
  current step and exits; if it is still alive after `grace_s`, the whole tree is killed. When the
  trainer exits, whatever is left of its process group (DataLoader workers, ...) is killed too.
* `ProgressFollower` reads the trainer's JSON-lines progress file incrementally.
"""
from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import threading
import time
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import psutil

LOG_TAIL_BYTES = 64 * 1024


class JobBusy(RuntimeError):
    """A training is already running."""


# ----- the progress file ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Progress:
    """What the progress file said so far."""

    started: bool = False
    total_steps: int | None = None
    step: int = 0
    epoch: int | None = None
    loss: float | None = None
    loss_avg: float | None = None
    lr: dict[str, float] = field(default_factory=dict)
    it_per_s: float | None = None
    eta_s: float | None = None
    losses: tuple[tuple[int, float], ...] = ()
    validation: tuple[tuple[int, float], ...] = ()
    samples: tuple[str, ...] = ()
    sample_step: int | None = None
    saved: tuple[str, ...] = ()
    end: dict[str, Any] | None = None


class ProgressFollower:
    """Reads new lines of a JSON-lines progress file on every `poll()`; a half-written last line waits
    for the next poll, unreadable lines are skipped, a truncated (restarted) file is read again."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._offset = 0
        self._partial = b""
        self._progress = Progress()

    @property
    def progress(self) -> Progress:
        return self._progress

    def poll(self) -> Progress:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return self._progress
        if size < self._offset:  # the file was started again
            self._offset, self._partial, self._progress = 0, b"", Progress()
        if size == self._offset:
            return self._progress
        with open(self.path, "rb") as handle:
            handle.seek(self._offset)
            chunk = handle.read(size - self._offset)
        self._offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        progress = self._progress
        for line in lines:
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(record, dict):
                progress = apply_event(progress, record)
        self._progress = progress
        return progress


def apply_event(progress: Progress, record: dict[str, Any]) -> Progress:
    """The progress after one event of lyco-train's progress file."""
    event = record.get("event")
    if event == "start":
        return replace(progress, started=True, total_steps=record.get("total_steps"), step=int(record.get("step") or 0), end=None)
    if event == "step":
        step, loss = int(record["step"]), record.get("loss")
        losses = progress.losses + ((step, float(loss)),) if loss is not None else progress.losses
        return replace(progress, step=step, epoch=record.get("epoch"), loss=loss, loss_avg=record.get("loss_avg"),
                       lr=record.get("lr") or {}, it_per_s=record.get("it_per_s"), eta_s=record.get("eta_s"),
                       total_steps=record.get("total_steps", progress.total_steps), losses=losses)
    if event == "validation":
        return replace(progress, validation=progress.validation + ((int(record["step"]), float(record["val_loss"])),))
    if event == "sample":
        return replace(progress, samples=tuple(record.get("paths") or ()), sample_step=record.get("step"))
    if event == "save":
        return replace(progress, saved=progress.saved + (str(record.get("path")),))
    if event == "end":
        return replace(progress, end=dict(record))
    return progress


# ----- the job --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobStatus:
    state: str  # idle | running | stopping | completed | stopped | failed
    alive: bool
    pid: int | None = None
    returncode: int | None = None
    progress: Progress = field(default_factory=Progress)
    message: str = ""
    run_dir: str | None = None
    command: tuple[str, ...] = ()
    started_at: float | None = None
    ended_at: float | None = None


class TrainingJob:
    """At most one child process at a time; thread-safe."""

    def __init__(self, *, grace_s: float = 60.0) -> None:
        self.grace_s = grace_s
        self._lock = threading.RLock()
        self._proc: subprocess.Popen | None = None
        self._follower: ProgressFollower | None = None
        self._log_path: Path | None = None
        self._run_dir: Path | None = None
        self._command: tuple[str, ...] = ()
        self._started_at: float | None = None
        self._ended_at: float | None = None
        self._stop_requested_at: float | None = None
        self._killed = False
        self._descendants: dict[int, psutil.Process] = {}
        _LIVE_JOBS.add(self)

    # ----- starting -----------------------------------------------------------------------------------
    def start(self, command: Sequence[str], *, log_path: str | os.PathLike, progress_path: str | os.PathLike,
              cwd: str | os.PathLike | None = None, env: dict[str, str] | None = None, run_dir: str | os.PathLike | None = None) -> JobStatus:
        with self._lock:
            if self.alive:
                status = self.status()
                where = f" (step {status.progress.step}/{status.progress.total_steps})" if status.progress.started else ""
                raise JobBusy(f"a training is already running (pid {status.pid}{where}); only one runs at a time: "
                              "stop it or wait until it ends")
            log_path = Path(log_path)
            log_path.parent.mkdir(parents=True, exist_ok=True)
            child_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
            with open(log_path, "ab") as log:
                self._proc = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                              cwd=None if cwd is None else str(cwd), env=child_env, start_new_session=True)
            self._follower = ProgressFollower(progress_path)
            self._log_path, self._command = log_path, tuple(command)
            self._run_dir = Path(run_dir) if run_dir else log_path.parent
            self._started_at, self._ended_at, self._stop_requested_at, self._killed = time.time(), None, None, False
            self._descendants = {}
            threading.Thread(target=self._watch, args=(self._proc,), name="lyco-train-watch", daemon=True).start()
            return self.status()

    # ----- state ------------------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        with self._lock:
            return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def status(self) -> JobStatus:
        with self._lock:
            proc = self._proc
            if proc is None:
                return JobStatus("idle", False, message="no training has run yet")
            code = proc.poll()
            progress = self._follower.poll() if self._follower else Progress()
            common = dict(pid=proc.pid, returncode=code, progress=progress, run_dir=str(self._run_dir), command=self._command,
                          started_at=self._started_at, ended_at=self._ended_at)
            if code is None:
                if self._stop_requested_at is not None:
                    waited = time.time() - self._stop_requested_at
                    return JobStatus("stopping", True, message=f"stopping: the trainer saves a resumable state after this step "
                                     f"({waited:.0f} s; killed after {self.grace_s:.0f} s)", **common)
                return JobStatus("running", True, message="training", **common)
            end = progress.end or {}
            if code == 0:
                return JobStatus("completed", False, message=f"completed: {end.get('adapter') or 'adapter saved'}", **common)
            if self._stop_requested_at is not None:
                if end.get("status") == "interrupted":
                    text = f"stopped at step {end.get('step')}: resumable state {end.get('state')}, adapter {end.get('adapter')}"
                elif self._killed:
                    text = f"stopped: killed after {self.grace_s:.0f} s without exiting (no state written)"
                elif progress.step:
                    text = (f"stopped after step {progress.step} (exit {describe_exit(code)}) outside a training step, "
                            "before the trainer saved a state; nothing to resume")
                else:
                    text = f"stopped before the first step (exit {describe_exit(code)}); nothing to resume"
                return JobStatus("stopped", False, message=text, **common)
            return JobStatus("failed", False, message=f"failed (exit {describe_exit(code)}); see the log", **common)

    def log_tail(self, max_bytes: int = LOG_TAIL_BYTES) -> str:
        with self._lock:
            path = self._log_path
        return read_log_tail(path, max_bytes) if path else ""

    # ----- stopping ---------------------------------------------------------------------------------------
    def stop(self) -> JobStatus:
        """Ask the trainer to stop (SIGTERM); it is killed with its tree after `grace_s` seconds."""
        with self._lock:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                return self.status()
            self._snapshot_descendants(proc)
            if self._stop_requested_at is None:
                self._stop_requested_at = time.time()
                _signal(proc.pid, signal.SIGTERM)
            return self.status()

    def kill(self) -> JobStatus:
        """Kill the child and everything it started, now."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return self.status()
            if self._stop_requested_at is None:
                self._stop_requested_at = time.time()
            if proc.poll() is None:
                self._killed = True
                self._snapshot_descendants(proc)
                _signal(proc.pid, signal.SIGKILL)
        self.wait(10)
        return self.status()

    def wait(self, timeout: float | None = None) -> bool:
        """True when the child has exited and its tree is gone within `timeout` seconds."""
        proc = self._proc
        if proc is None:
            return True
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        deadline = time.time() + (timeout if timeout is not None else 10)
        while self._ended_at is None and time.time() < deadline:
            time.sleep(0.02)
        return self._ended_at is not None

    def shutdown(self, grace_s: float = 10.0) -> None:
        """Stop a running child (used when the UI exits)."""
        if not self.alive:
            return
        self.stop()
        if not self.wait(grace_s):
            self.kill()

    # ----- the watcher ------------------------------------------------------------------------------------
    def _watch(self, proc: subprocess.Popen) -> None:
        while True:
            try:
                proc.wait(timeout=0.25)
                break
            except subprocess.TimeoutExpired:
                pass
            with self._lock:
                if proc is not self._proc:
                    return
                self._snapshot_descendants(proc)
                asked = self._stop_requested_at
                if asked is not None and not self._killed and time.time() - asked > self.grace_s:
                    self._killed = True
                    _signal(proc.pid, signal.SIGKILL)
        self._reap_group(proc)
        with self._lock:
            if proc is self._proc:
                self._ended_at = time.time()

    def _snapshot_descendants(self, proc: subprocess.Popen) -> None:
        try:
            for child in psutil.Process(proc.pid).children(recursive=True):
                self._descendants.setdefault(child.pid, child)
        except psutil.Error:
            pass

    def _reap_group(self, proc: subprocess.Popen) -> None:
        """Kill what is left of the child's process group and of the descendants seen while it ran."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the child led its own session, so its pid is the group id
        except (ProcessLookupError, PermissionError):
            pass
        leftovers = [p for p in self._descendants.values() if _same_alive(p)]
        for process in leftovers:
            try:
                process.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(leftovers, timeout=5)


def _same_alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"{code}, {signal.Signals(-code).name}"
        except ValueError:
            return str(code)
    if code > 128:
        try:
            return f"{code}, after {signal.Signals(code - 128).name}"
        except ValueError:
            pass
    return {1: "1, error", 2: "2, invalid configuration"}.get(code, str(code))


def read_log_tail(path: str | os.PathLike, max_bytes: int = LOG_TAIL_BYTES) -> str:
    """The end of a log file, with progress-bar carriage returns collapsed to the last update per line."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            data = handle.read()
    except FileNotFoundError:
        return ""
    text = data.decode("utf-8", errors="replace")
    if size > max_bytes:
        text = text.split("\n", 1)[-1]
    lines = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]
    return "\n".join(lines)


_LIVE_JOBS: "weakref.WeakSet[TrainingJob]" = weakref.WeakSet()


@atexit.register
def _stop_children_at_exit() -> None:
    for job in list(_LIVE_JOBS):
        try:
            job.shutdown()
        except Exception:  # exiting anyway
            pass
