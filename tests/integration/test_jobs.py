"""Cluster jobs end to end: a real Ray head (`ray start --head`, dashboard on loopback) that this
test starts and stops itself, the shipped tiny training job spec submitted and followed to
SUCCEEDED through `aigc-ray submit`, a failing spec, and `aigc-ray jobs list|status|logs|stop|delete`.

The head runs next to the test session's own local cluster, so every port is chosen free and
its temp dir is its own (a `ray start` writes the address other `ray.init()` calls would find
there); it is stopped by ending the process group it was started in, never `ray stop`, which
would end every Ray process on the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from aigc_ray.run_folder import CheckpointFolder, RunFolder

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_head(temp_dir: str, env: dict, attempts: int = 3):
    """(`ray start --head --block` process, dashboard address, its log file) once the job API
    answers. The ports are picked free, but between picking and binding another process (the
    session's own Ray workers bind ephemeral ports all the time) can take one: the head then
    exits at once ("Address already in use"), and it is started again on fresh ports."""
    for attempt in range(attempts):
        dashboard = free_port()
        log_path = Path(temp_dir) / f"head-{attempt}.log"
        log = open(log_path, "wb")
        head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
             f"--port={free_port()}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={free_port()}",
             f"--ray-client-server-port={free_port()}", f"--metrics-export-port={free_port()}",
             "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 90
        while head.poll() is None and not _api_up(address):
            assert time.monotonic() < deadline, "the Ray head's job API did not come up in 90 s"
            time.sleep(1)
        if head.poll() is None:
            return head, address, log
        log.close()
        text = log_path.read_text(errors="replace")
        taken = "already in use" in text or "Failed to start" in text  # a port was taken
        if not taken or attempt == attempts - 1:
            raise AssertionError(f"the Ray head exited: {text[-2000:]}")
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def ray_head():
    """(dashboard address, env for CLI subprocesses) of a 2-CPU head this test owns."""
    temp_dir = tempfile.mkdtemp(prefix="aigcjob-", dir="/tmp")  # short: socket paths are capped
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    # On SIGTERM a `ray start` node first drains (30 s by default) so Serve proxies can stop
    # taking traffic; this head serves nothing, so it stops at once.
    head_env = {**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    head, address, log = start_head(temp_dir, head_env)
    try:
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops its processes on exit
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _api_up(address: str) -> bool:
    from aigc_ray.jobs import auth_token

    request = urllib.request.Request(f"{address}/api/version")
    token = auth_token()
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


def aigc(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "aigc-ray"), *args], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_the_head_requires_the_token_we_send(ray_head):
    from aigc_ray.jobs import auth_token

    address, _ = ray_head
    if auth_token() is None:
        pytest.skip("no Ray token on this machine, so the head runs without authentication")
    with pytest.raises(urllib.error.HTTPError) as refused:  # no token: Ray refuses
        urllib.request.urlopen(f"{address}/api/version", timeout=5)
    assert refused.value.code == 401


def test_tiny_training_spec_runs_to_success_and_writes_final(ray_head, tmp_path):
    address, env = ray_head
    runs = tmp_path / "runs"
    done = aigc(env, "submit", "jobs/train_tiny_cpu.yaml", "--address", address, "--follow",
                "train.max_steps=10", "train.eval_every=5", "eval.after_training=false",
                f"run.output_dir={runs}", "run.name=job-tiny")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    job_id = done.stdout.splitlines()[0]
    assert job_id.startswith("train-tiny-cpu-")
    assert "step 10/10" in done.stdout and f"job {job_id} SUCCEEDED" in done.stderr
    final = CheckpointFolder(RunFolder(runs / "job-tiny").final)
    assert (final.path / "model.safetensors").is_file() and final.config.is_file()

    # --address wins over RAY_ADDRESS (Ray's own client would try the dead RAY_ADDRESS).
    dead = {**env, "RAY_ADDRESS": "http://127.0.0.1:1"}
    listed = aigc(dead, "jobs", "list", "--address", address)
    assert listed.returncode == 0 and any(
        line.startswith(job_id) and "SUCCEEDED" in line for line in listed.stdout.splitlines())
    status = aigc(env, "jobs", "status", job_id, "--address", address)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout
    logs = aigc(env, "jobs", "logs", job_id, "--address", address)
    assert "final model in" in logs.stdout
    assert aigc(env, "jobs", "delete", job_id, "--address", address).returncode == 0
    assert aigc(env, "jobs", "status", job_id, "--address", address).returncode == 2  # gone


def test_a_failing_spec_ends_failed_with_its_error_shown(ray_head, tmp_path):
    address, env = ray_head
    spec = tmp_path / "broken.yaml"  # valid to check here; the data is missing on the cluster
    spec.write_text("name: broken\n"
                    "entrypoint: aigc-ray train tiny_cpu data.path=/nonexistent/corpus.jsonl\n"
                    "runtime_env: {working_dir: null}\n")
    failed = aigc(env, "submit", str(spec), "--address", address, "--follow")
    assert failed.returncode == 1
    assert "data.path /nonexistent/corpus.jsonl does not exist" in failed.stdout
    job_id = failed.stdout.splitlines()[0]
    assert f"job {job_id} FAILED" in failed.stderr
    status = aigc(env, "jobs", "status", job_id, "--address", address)
    assert status.returncode == 1 and "FAILED" in status.stdout


def test_stop_ends_a_running_job(ray_head, tmp_path):
    address, env = ray_head
    spec = tmp_path / "sleep.yaml"
    spec.write_text("name: sleeper\nentrypoint: sleep 300\nruntime_env: {working_dir: null}\n")
    submitted = aigc(env, "submit", str(spec), "--address", address)
    assert submitted.returncode == 0
    job_id = submitted.stdout.strip()
    running = aigc(env, "jobs", "delete", job_id, "--address", address)  # not ended: refused
    assert running.returncode == 2
    assert running.stderr.strip().splitlines()[-1].startswith("error: aigc-ray jobs delete: ")
    assert aigc(env, "jobs", "stop", job_id, "--address", address).returncode == 0
    deadline = time.monotonic() + 60
    while "STOPPED" not in aigc(env, "jobs", "status", job_id, "--address", address).stdout:
        assert time.monotonic() < deadline, "the job did not stop within 60 s"
        time.sleep(1)


def test_bad_spec_unknown_job_and_unreachable_cluster_fail_with_one_line(tmp_path, ray_head):
    address, env = ray_head
    unknown = aigc(env, "jobs", "status", "no-such-job", "--address", address)
    assert unknown.returncode == 2
    assert unknown.stderr.strip().splitlines()[-1].startswith("error: aigc-ray jobs status: ")
    assert "no-such-job" in unknown.stderr
    spec = tmp_path / "typo.yaml"
    spec.write_text("name: typo\nentrypoint: aigc-ray train tiny_cpu train.lrr=1\n"
                    "runtime_env: {working_dir: null}\n")
    bad = aigc(env, "submit", str(spec), "--address", "http://127.0.0.1:9")
    assert bad.returncode == 2  # caught here: nothing was sent to the (absent) cluster
    assert bad.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "did you mean train.lr" in bad.stderr
    down = aigc(env, "jobs", "list", "--address", f"http://127.0.0.1:{free_port()}")
    assert down.returncode == 2
    assert "cannot reach the Ray job API" in down.stderr.strip().splitlines()[-1]
