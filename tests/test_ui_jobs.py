"""ui.jobs: the training child process (start, state from the process, stop with a state, kill of the tree)
and the progress-file follower. A small fake trainer stands in for lyco-train, so these run in seconds."""
from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from ui.jobs import JobBusy, ProgressFollower, TrainingJob, describe_exit, read_log_tail

FAKE_TRAINER = textwrap.dedent("""
    import json, os, signal, subprocess, sys, time
    progress, steps, delay, mode = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    stop = []
    if mode == "ignore":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    if mode in ("grandchild", "ignore"):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        print("grandchild", child.pid, flush=True)
    def write(**record):
        with open(progress, "a") as f:
            f.write(json.dumps(record) + "\\n")
    write(event="start", total_steps=steps, step=0)
    for step in range(1, steps + 1):
        time.sleep(delay)
        write(event="step", step=step, loss=1.0 / step, loss_avg=1.0, lr={"unet": 1e-3}, eta_s=(steps - step) * delay, total_steps=steps)
        print(f"step {step}", flush=True)
        if stop:
            os.makedirs(os.path.join(os.path.dirname(progress), "state"), exist_ok=True)
            write(event="end", status="interrupted", step=step, state="state", adapter="a.safetensors")
            print("stopped by SIGTERM", file=sys.stderr, flush=True)
            sys.exit(143)
    if mode == "fail":
        print("Traceback: boom", file=sys.stderr, flush=True)
        sys.exit(1)
    write(event="end", status="completed", step=steps, adapter="a.safetensors")
""")


@pytest.fixture
def fake(tmp_path: Path):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)

    def start(job: TrainingJob, *, steps: int = 3, delay: float = 0.05, mode: str = "normal", name: str = "run"):
        run = tmp_path / name
        run.mkdir()
        progress = run / "progress.jsonl"
        job.start([sys.executable, str(script), str(progress), str(steps), str(delay), mode], log_path=run / "train.log", progress_path=progress)
        return run

    return start


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def grandchild_pid(job: TrainingJob) -> int:
    wait_for(lambda: "grandchild" in job.log_tail())
    return int(job.log_tail().split("grandchild", 1)[1].split()[0])


def test_follower_reads_new_lines_waits_for_partial_ones_and_restarts(tmp_path: Path) -> None:
    path = tmp_path / "progress.jsonl"
    follower = ProgressFollower(path)
    assert follower.poll().started is False  # no file yet
    path.write_text(json.dumps({"event": "start", "total_steps": 4, "step": 0}) + "\n" + '{"event": "step", "st')
    p = follower.poll()
    assert p.started and p.total_steps == 4 and p.step == 0
    with open(path, "a") as handle:
        handle.write('ep": 1, "loss": 0.5, "eta_s": 3}\nnot json\n')
        handle.write(json.dumps({"event": "sample", "step": 1, "paths": ["s.png"]}) + "\n")
        handle.write(json.dumps({"event": "save", "step": 1, "path": "a.safetensors"}) + "\n")
    p = follower.poll()
    assert (p.step, p.loss, p.eta_s, p.losses, p.samples, p.sample_step, p.saved) == (1, 0.5, 3, ((1, 0.5),), ("s.png",), 1, ("a.safetensors",))
    path.write_text(json.dumps({"event": "start", "total_steps": 2, "step": 0}) + "\n")  # a new run truncates the file
    p = follower.poll()
    assert p.total_steps == 2 and p.losses == ()


def test_job_runs_to_completion_and_state_follows_the_process(fake) -> None:
    job = TrainingJob()
    assert job.status().state == "idle" and not job.alive
    fake(job, steps=3, delay=0.2)
    status = job.status()
    assert status.state == "running" and status.alive and psutil.pid_exists(status.pid)
    assert job.wait(20)
    status = job.status()
    assert (status.state, status.alive, status.returncode) == ("completed", False, 0)
    assert status.progress.step == 3 and len(status.progress.losses) == 3 and "a.safetensors" in status.message
    assert "step 3" in job.log_tail()


def test_one_job_at_a_time(fake) -> None:
    job = TrainingJob()
    fake(job, steps=50, delay=0.1, name="first")
    try:
        with pytest.raises(JobBusy, match="already running"):
            fake(job, name="second")
    finally:
        job.kill()
    assert not job.alive


def test_stop_sends_sigterm_the_trainer_saves_and_the_tree_is_gone(fake, tmp_path: Path) -> None:
    job = TrainingJob(grace_s=30)
    run = fake(job, steps=200, delay=0.1, mode="grandchild")
    grandchild = grandchild_pid(job)
    wait_for(lambda: job.status().progress.step >= 1)
    assert job.stop().state in ("stopping", "stopped")
    assert job.wait(20)
    status = job.status()
    assert (status.state, status.alive) == ("stopped", False)
    assert "resumable state" in status.message and (run / "state").is_dir()
    assert status.returncode == 143 and "SIGTERM" in describe_exit(status.returncode)
    assert gone(status.pid) and gone(grandchild)


def test_a_trainer_that_ignores_stop_is_killed_with_its_tree_after_the_grace_period(fake) -> None:
    job = TrainingJob(grace_s=0.5)
    fake(job, steps=500, delay=0.1, mode="ignore")
    grandchild = grandchild_pid(job)
    job.stop()
    assert job.wait(20)
    status = job.status()
    assert status.state == "stopped" and "killed" in status.message and status.returncode == -9
    assert gone(status.pid) and gone(grandchild)


def test_a_failing_trainer_reports_failed_with_the_log(fake) -> None:
    job = TrainingJob()
    fake(job, steps=1, delay=0.01, mode="fail")
    assert job.wait(20)
    status = job.status()
    assert status.state == "failed" and "1, error" in status.message
    assert "Traceback: boom" in job.log_tail()


def test_log_tail_collapses_progress_bars(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    log.write_bytes(b"model loaded\ntrain: 1/4\rtrain: 2/4\rtrain: 4/4\ndone\n")
    assert read_log_tail(log) == "model loaded\ntrain: 4/4\ndone\n"
    assert read_log_tail(log, max_bytes=10) == "done\n"
    assert read_log_tail(tmp_path / "missing.log") == ""
