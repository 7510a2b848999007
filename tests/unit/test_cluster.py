"""Which Ray cluster a command joins, and that a dead one fails in seconds with one line.

Ray looks for the address file of the last `ray start` under RAY_TMPDIR, so each test points
RAY_TMPDIR at its own folder: the real /tmp/ray, which other Ray users share, is never touched.
No cluster is started here.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aigc_ray.cluster import answers, cluster_to_join, host_and_port
from aigc_ray.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def listening():
    """A port something accepts connections on, on every interface as a GCS listens (Ray turns
    127.0.0.1 in the address file into this machine's address)."""
    with socket.socket() as server:
        server.bind(("", 0))
        server.listen()
        yield server.getsockname()[1]


@pytest.fixture
def closed():
    """A port nothing listens on (a head that died)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_tmpdir(tmp_path, monkeypatch) -> Path:
    """Ray's temp folder for this test; returns where `ray start` writes its address file."""
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "ray").mkdir()
    return tmp_path / "ray" / "ray_current_cluster"


def test_answers_a_listening_port_and_not_a_closed_one_quickly(listening, closed):
    assert answers("127.0.0.1", listening)
    started = time.monotonic()
    assert not answers("127.0.0.1", closed)
    assert time.monotonic() - started < 1


@pytest.mark.parametrize("address, expected", [
    ("10.0.0.5:6379", ("10.0.0.5", 6379)),
    ("[::1]:6379", ("::1", 6379)),
    ("ray://head.example:10001", ("head.example", 10001)),
    ("ray://head.example", ("head.example", 10001)),  # Ray Client's default port
    ("head.example", None),  # no port: Ray's own error stands
])
def test_host_and_port(address, expected):
    assert host_and_port(address) == expected


def test_a_stale_address_file_fails_in_seconds_naming_the_fix(ray_tmpdir, closed):
    ray_tmpdir.write_text(f"127.0.0.1:{closed}")
    started = time.monotonic()
    with pytest.raises(ConfigError) as error:
        cluster_to_join(None)
    assert time.monotonic() - started < 5
    message = str(error.value)
    assert "\n" not in message
    assert f":{closed}" in message and str(ray_tmpdir) in message
    assert "`ray stop`" in message and "RAY_ADDRESS=local" in message


def test_a_live_address_file_is_joined_and_no_file_starts_a_local_ray(ray_tmpdir, listening):
    assert cluster_to_join(None) is None  # no `ray start` here: a local cluster
    assert cluster_to_join("local") is None
    ray_tmpdir.write_text(f"127.0.0.1:{listening}")
    assert cluster_to_join(None).endswith(f":{listening}")
    assert cluster_to_join("local") is None  # local wins over the file, as in Ray


@pytest.mark.parametrize("form", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}"])
def test_an_unreachable_ray_address_fails_in_seconds(ray_tmpdir, closed, form):
    address = form.format(port=closed)
    started = time.monotonic()
    with pytest.raises(ConfigError) as error:
        cluster_to_join(address)
    assert time.monotonic() - started < 5
    assert str(error.value).startswith(f"cannot reach the Ray cluster at RAY_ADDRESS={address}: "
                                       f"nothing answers at 127.0.0.1:{closed}")
    assert "unset RAY_ADDRESS" in str(error.value)


def test_train_with_a_stale_address_file_is_one_line_and_exit_2(ray_tmpdir, closed, tmp_path):
    """What the issue saw: `aigc-ray train` after a head died without `ray stop` spent ten
    minutes in GCS warnings and ended in a traceback."""
    ray_tmpdir.write_text(f"127.0.0.1:{closed}")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"prompt": "Customer: hi\\nAgent:", "completion": " Hello."}\n')
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "aigc_ray", "train", f"data.path={corpus}",
         f"run.output_dir={tmp_path / 'runs'}"],
        cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=120)
    assert time.monotonic() - started < 60  # the imports; the check itself is seconds
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: no Ray cluster answers at"), lines
    assert "ray stop" in lines[0]
