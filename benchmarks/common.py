"""Shared helpers for lyco benchmarks: one process per configuration, RSS measurement, robust
statistics, interleaved scheduling and markdown tables.

Nothing here knows about adapters or models, so every benchmark script can use it:

    # parent
    schedule = interleaved_schedule(configs, rounds=2)
    for round_index, config in schedule:
        result = run_worker([sys.executable, __file__, "--worker"], config, timeout=900)

    # worker (the same script, started with --worker)
    config = worker_payload()
    ...
    emit_worker_result({"times": times, **memory_snapshot()})

The parent passes the payload as JSON in an environment variable and the worker writes its result as
JSON to a file the parent names, so nothing depends on what libraries print on stdout.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

PAYLOAD_ENV = "LYCO_BENCH_PAYLOAD"
RESULT_ENV = "LYCO_BENCH_RESULT"

GIB = 1024**3
MIB = 1024**2


# ----- memory ---------------------------------------------------------------------------------------
def _proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile ... of this process in bytes (Linux); {} elsewhere."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                parts = value.split()
                if len(parts) == 2 and parts[1] == "kB":
                    out[key] = int(parts[0]) * 1024
    except OSError:
        pass
    return out


def rss_bytes() -> int:
    """Current resident set size (anonymous + file-backed pages)."""
    status = _proc_status()
    if "VmRSS" in status:
        return status["VmRSS"]
    import psutil  # fallback for non-Linux

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since start (or since the last reset_peak_rss())."""
    status = _proc_status()
    if "VmHWM" in status:
        return status["VmHWM"]
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux: `5` into /proc/self/clear_refs). False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_snapshot(prefix: str = "") -> dict[str, int]:
    """rss, peak_rss and (on Linux) the anonymous / file-backed split, in bytes."""
    status = _proc_status()
    snap = {f"{prefix}rss": rss_bytes(), f"{prefix}peak_rss": peak_rss_bytes()}
    for key, name in (("RssAnon", "rss_anon"), ("RssFile", "rss_file")):
        if key in status:
            snap[f"{prefix}{name}"] = status[key]
    return snap


# ----- machine --------------------------------------------------------------------------------------
def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(packages: Iterable[str] = ()) -> dict[str, Any]:
    """CPU, cores, RAM, python, the given packages' versions, and the git commit of the working tree."""
    import importlib.metadata as md

    try:
        import psutil

        ram = psutil.virtual_memory().total
    except ImportError:  # pragma: no cover
        ram = None
    versions = {}
    for name in packages:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "ram_bytes": ram,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "git_commit": git_commit(),
        "load_average": load_average(),
    }


def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd or Path(__file__).parent, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def wait_for_quiet(max_load: float | None, max_wait_s: float, poll_s: float = 10.0) -> float | None:
    """Sleep until the 1-minute load average is below max_load (at most max_wait_s). Returns the load seen last."""
    load = load_average()
    if max_load is None or load is None:
        return None if load is None else load[0]
    deadline = time.monotonic() + max_wait_s
    while load[0] >= max_load and time.monotonic() < deadline:
        time.sleep(poll_s)
        load = load_average() or load
    return load[0]


# ----- processes ------------------------------------------------------------------------------------
class WorkerError(RuntimeError):
    pass


def run_worker(
    command: Sequence[str],
    payload: Mapping[str, Any],
    *,
    timeout: float | None = None,
    log_path: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Run one configuration in a fresh process and return the dict it emitted.

    The payload goes in as JSON (env LYCO_BENCH_PAYLOAD); the worker calls emit_worker_result().
    stdout/stderr go to log_path (or are discarded). Adds `wall_s` (process lifetime seen from here)
    and the parent's view of the load average before and after."""
    fd, result_path = tempfile.mkstemp(prefix="bench_result_", suffix=".json")
    os.close(fd)
    child_env = dict(os.environ if env is None else env)
    child_env[PAYLOAD_ENV] = json.dumps(payload)
    child_env[RESULT_ENV] = result_path
    load_before = load_average()
    start = time.perf_counter()
    log = open(log_path, "a") if log_path else subprocess.DEVNULL
    try:
        proc = subprocess.run(list(command), env=child_env, stdout=log, stderr=subprocess.STDOUT if log_path else subprocess.DEVNULL, timeout=timeout)
        wall = time.perf_counter() - start
        text = Path(result_path).read_text()
        if proc.returncode != 0 or not text:
            raise WorkerError(f"worker {payload.get('name', payload)} exited {proc.returncode}" + (f"; see {log_path}" if log_path else ""))
        result = json.loads(text)
    except subprocess.TimeoutExpired:
        raise WorkerError(f"worker {payload.get('name', payload)} timed out after {timeout} s") from None
    finally:
        if log_path:
            log.close()
        try:
            os.unlink(result_path)
        except OSError:
            pass
    result["wall_s"] = wall
    result["parent_load_before"] = load_before
    result["parent_load_after"] = load_average()
    return result


def worker_payload() -> dict[str, Any]:
    """The payload the parent passed to this worker process."""
    return json.loads(os.environ[PAYLOAD_ENV])


def emit_worker_result(result: Mapping[str, Any]) -> None:
    """Hand the result to the parent (JSON file named by the parent; stdout when run by hand)."""
    path = os.environ.get(RESULT_ENV)
    text = json.dumps(result)
    if path:
        Path(path).write_text(text)
    else:
        print(text)


def interleaved_schedule(configs: Sequence[Any], rounds: int) -> list[tuple[int, Any]]:
    """(round, config) pairs: every config once per round, alternating forward and reversed order so that
    a slow drift in machine load hits all configurations alike (A B C, C B A, A B C, ...)."""
    out = []
    for r in range(rounds):
        order = list(configs) if r % 2 == 0 else list(reversed(configs))
        out.extend((r, c) for c in order)
    return out


# ----- statistics -----------------------------------------------------------------------------------
def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (q in [0, 1])."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """n, median, p25, p75, min, max, mean and the relative inter-quartile spread (IQR / median)."""
    if not values:
        return {"n": 0}
    med = statistics.median(values)
    p25, p75 = quantile(values, 0.25), quantile(values, 0.75)
    return {
        "n": len(values),
        "median": med,
        "p25": p25,
        "p75": p75,
        "min": min(values),
        "max": max(values),
        "mean": statistics.fmean(values),
        "rel_iqr": (p75 - p25) / med if med else float("nan"),
    }


# ----- output ---------------------------------------------------------------------------------------
def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub markdown table; align is one char per column ('l', 'r', 'c'), default left for the first
    column and right for the others."""
    rows = [["" if v is None else str(v) for v in row] for row in rows]
    align = align or ("l" + "r" * (len(headers) - 1))
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(marks[a] for a in align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_bytes(n: float | None, unit: int = GIB, digits: int = 2) -> str:
    if n is None:
        return "–"
    return f"{n / unit:.{digits}f}"


def fmt_ratio(x: float | None, digits: int = 2) -> str:
    if x is None or x != x:  # None or NaN
        return "–"
    return f"{x:.{digits}f}x"


def today() -> str:
    return _dt.date.today().isoformat()


def write_json(path: str | os.PathLike, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def replace_marked_block(path: str | os.PathLike, marker: str, content: str) -> bool:
    """Replace the text between `<!-- {marker}:start -->` and `<!-- {marker}:end -->` in a file.
    Returns False (and changes nothing) when the markers are missing."""
    path = Path(path)
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    text = path.read_text() if path.exists() else ""
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        return False
    path.write_text(text[: i + len(start)] + "\n" + content.rstrip() + "\n" + text[j:])
    return True
