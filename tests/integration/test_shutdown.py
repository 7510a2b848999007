"""Stopping commands the way services are stopped: SIGTERM (systemd, Kubernetes, `kill`) does what
Ctrl-C does, and a successful run ends without alarming lines from Ray.

Each command runs in its own process on its own local Ray (as a user's would), so nothing here
shares the session cluster.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from aigc_ray.run_folder import RunFolder

# What Ray printed before: its C++ handler's stack dump ("*** SIGTERM received ... ***", then
# the shell's "Aborted"), a traceback, and Serve's controller reported as a failed task.
ALARMING = ("SIGTERM received", "Aborted", "Traceback", "graceful_shutdown failed",
            "killed by `ray.kill`")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_ray_env() -> dict:
    """This environment without RAY_ADDRESS: the command starts its own local Ray."""
    return {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}


class Running:
    """A command in its own process, its output (stdout and stderr) collected as it comes."""

    def __init__(self, args: list[str], cwd: Path):
        self.process = subprocess.Popen([sys.executable, "-m", "aigc_ray", *args], cwd=cwd,
                                        env=local_ray_env(), stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout),
                                       daemon=True)
        self.reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_until(self, condition, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if self.process.poll() is not None:
                raise AssertionError(f"exited with {self.process.returncode} before {what}:\n"
                                     + self.output[-3000:])
            if time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError(f"no {what} in {timeout_s:.0f} s:\n" + self.output[-3000:])
            time.sleep(0.2)

    def terminate(self, timeout_s: float) -> int:
        """SIGTERM, then wait for the process to exit; its exit code."""
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"still running {timeout_s:.0f} s after SIGTERM:\n"
                                 + self.output[-3000:]) from None
        self.reader.join(timeout=10)
        return code


def assert_nothing_alarming(output: str) -> None:
    for words in ALARMING:
        assert words not in output, output[-3000:]


def models_answer(url: str) -> bool:
    try:
        return httpx.get(url + "/v1/models", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_sigterm_stops_serve_like_ctrl_c(tiny_model_dir, tmp_path):
    """`aigc-ray serve` answering HTTP, then SIGTERM: the app deleted, Serve and Ray shut down,
    exit 0, nothing alarming."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serving = Running(["serve", tiny_model_dir, f"serve.port={port}",
                       "serve.cpus_per_replica=0.5"], tmp_path)
    serving.wait_until(lambda: "Ctrl-C stops" in serving.output and models_answer(url), 180,
                       "answer over HTTP")
    assert serving.terminate(timeout_s=60) == 0, serving.output[-3000:]
    assert "stopping" in serving.output
    assert_nothing_alarming(serving.output)
    assert not models_answer(url)  # the HTTP proxy went with Serve


def test_serve_once_ends_without_alarming_lines(tiny_model_dir, tmp_path):
    """What `make demo` ends with, in its own process and its own local Ray: deploy, answer one
    prompt over HTTP, then shut Serve down in the order Ray expects, so no "(raylet) Task
    ServeController.graceful_shutdown failed" follows success."""
    done = subprocess.run(
        [sys.executable, "-m", "aigc_ray", "serve", tiny_model_dir, f"serve.port={free_port()}",
         "serve.cpus_per_replica=0.5", "serve.default_max_tokens=4", "--once", "Hi"],
        cwd=tmp_path, env=local_ray_env(), capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "→" in done.stdout and "tokens from" in done.stdout
    assert_nothing_alarming(output)


def checkpointed_steps(run_dir: Path) -> list[int]:
    """Steps of the checkpoints Ray Train has registered (a rerun resumes from the last)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        results = json.loads(snapshot.read_text())["checkpoint_results"]
    except (OSError, ValueError):  # not written yet, or being rewritten
        return []
    return [result["metrics"]["step"] for result in results]


@pytest.mark.slow
def test_sigterm_stops_training_resumably(ray_cluster, sample_corpus, tiny_model_dir, tmp_path):
    """SIGTERM mid-run: exit 130 with the command that resumes it, nothing alarming; running
    that command again resumes from the last checkpoint rather than from step 0 (on the test
    session's cluster: the run folder holds all it needs, whichever cluster runs it)."""
    args = ["train", "tiny_cpu", f"model.name_or_path={tiny_model_dir}",
            f"data.path={sample_corpus['jsonl']}", "train.seed=0", "train.log_every=5",
            "train.eval_every=5", "scaling.num_workers=1", f"run.output_dir={tmp_path}",
            "run.name=term", "eval.after_training=false"]
    run_dir = tmp_path / "term"
    training = Running([*args, "train.max_steps=1000"], tmp_path)  # far longer than the test
    training.wait_until(lambda: checkpointed_steps(run_dir), 240, "registered checkpoint")
    assert training.terminate(timeout_s=60) == 130, training.output[-3000:]
    assert "resume it from its last checkpoint with: aigc-ray train tiny_cpu" in training.output
    assert_nothing_alarming(training.output)

    # The same run, told to end a few steps after its last checkpoint.
    last = max(checkpointed_steps(run_dir))
    session = {**local_ray_env(), "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    again = subprocess.run([sys.executable, "-m", "aigc_ray", *args, f"train.max_steps={last + 5}"],
                           cwd=tmp_path, env=session, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    resumed = [line for line in again.stdout.splitlines() if "resuming at step" in line]
    assert resumed and f"resuming at step {last}" in resumed[0], again.stdout[-3000:]
    assert (RunFolder(run_dir).final / "model.safetensors").exists()
