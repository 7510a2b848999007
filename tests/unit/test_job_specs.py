"""jobs/ and aigc_ray.jobs without a cluster: every shipped job spec loads, a bad spec fails with
one line naming what to change, configs must travel with the job, and the job API's address and
errors are ours. Submitting to a real head is tests/integration/test_jobs.py."""

import os
import shlex
from pathlib import Path

import pytest

from aigc_ray.cli import build_parser
from aigc_ray.config import shipped_configs, split_config_args
from aigc_ray.errors import ConfigError
from aigc_ray.jobs import (
    aigc_commands,
    client,
    job_command,
    load_job_spec,
    runtime_env,
)

REPO = Path(__file__).resolve().parents[2]
JOB_SPECS = sorted((REPO / "jobs").glob("*.yaml"))


@pytest.fixture(autouse=True)
def at_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)  # job specs upload `.`, the repo root, as the README says


def load(path, overrides=None):
    """A job spec checked against the CLI's own parser, as `aigc-ray submit` checks it."""
    return load_job_spec(str(path), overrides, parser=build_parser())


def test_there_is_a_job_spec_per_kind_of_job():
    assert {p.stem for p in JOB_SPECS} >= {"train", "tune", "serve", "generate"}


@pytest.mark.parametrize("path", JOB_SPECS, ids=lambda p: p.name)
def test_job_specs_load_and_their_entrypoints_parse(path):
    spec = load(path.relative_to(REPO))
    assert aigc_commands(spec.entrypoint), "every shipped spec runs aigc-ray"
    env = runtime_env(spec)
    assert env["working_dir"] == str(REPO) and ".venv" in env["excludes"]
    assert f"aigc-ray submit jobs/{path.name}" in path.read_text().splitlines()[0]


def test_overrides_are_appended_to_the_entrypoint_and_checked():
    spec = load("jobs/train_tiny_cpu.yaml", ["train.max_steps=5", "run.name=a-b"])
    assert spec.entrypoint.endswith("train tiny_cpu run.output_dir=/tmp/aigc-ray/runs "
                                    "train.max_steps=5 run.name=a-b")
    with pytest.raises(ConfigError, match="run.name"):  # a space is not a valid run name
        load("jobs/train_tiny_cpu.yaml", ["run.name=x y"])


@pytest.mark.parametrize("text, words", [
    ("entrypont: aigc-ray train\n", "did you mean entrypoint"),
    ("entrypoint: aigc-ray trian tiny_cpu\n", "not a valid aigc-ray command"),
    ("entrypoint: aigc-ray train tiny_cpu --resume\n", "unrecognized arguments --resume"),
    ("entrypoint: aigc-ray train tiny_cpu train.lr=-1\n", "train.lr must be > 0"),
    ("entrypoint: aigc-ray train tiny_cpu bogus\n", "'bogus' is not key=value"),
    ("entrypoint: aigc-ray train nope.yaml\n", "neither a shipped config nor a file"),
    ("entrypoint: aigc-ray train\nconfig: /etc/hostname\n", "outside working_dir"),
    ("entrypoint: aigc-ray train\nruntime_env: {workdir: .}\n", "did you mean working_dir"),
    ("entrypoint: aigc-ray train\nruntime_env: {working_dir: no/such/dir}\n",
     "runtime_env.working_dir no/such/dir does not exist"),
    ("entrypoint: aigc-ray train\nentrypoint_num_cpus: -1\n",
     "entrypoint_num_cpus must be >= 0.0, got -1"),  # config's wording: one formatter
    ("name: a b\nentrypoint: aigc-ray train\n", "name string should match pattern"),
    ("runtime_env: {working_dir: .}\n", "entrypoint is required"),
    ("entrypoint: [aigc-ray\n", "not valid YAML"),
    ("[1, 2]\n", "must hold a mapping"),
])
def test_bad_job_specs_fail_with_one_line(tmp_path, text, words):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load(path)
    assert words in str(error.value) and "\n" not in str(error.value)
    assert str(error.value).startswith(str(path))  # the line names the file to change


def test_a_missing_spec_names_where_examples_are():
    with pytest.raises(ConfigError, match="does not exist .see jobs/ for examples"):
        load("jobs/nope.yaml")


def _tiny_config(folder: Path) -> Path:
    (folder / "configs").mkdir()
    config = folder / "configs" / "mine.yaml"
    config.write_text(shipped_configs()["tiny_cpu"].read_text())
    return config


def test_a_config_file_in_working_dir_is_loaded_as_the_job_will(tmp_path):
    config = _tiny_config(tmp_path)
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"entrypoint: aigc-ray train configs/mine.yaml train.max_steps=3\n"
                    f"config: {config}\nruntime_env: {{working_dir: {tmp_path}}}\n")
    assert load(spec).config == str(config)
    spec.write_text(f"entrypoint: aigc-ray train configs/mine.yaml train.lrr=1\n"
                    f"runtime_env: {{working_dir: {tmp_path}}}\n")
    with pytest.raises(ConfigError, match="did you mean train.lr"):
        load(spec)


@pytest.mark.parametrize("entrypoint, extra, words", [
    ("aigc-ray train {config}", "", "name it relative to working_dir: configs/mine.yaml"),
    ("aigc-ray train /etc/hostname", "", "move it into working_dir"),
    ("aigc-ray train configs/mine.yaml", "", None),
    ("aigc-ray train tiny_cpu", "config: {config}\n", "not what the entrypoint runs"),
    ("aigc-ray train configs/mine.yaml", "config: /etc/hostname\n", "outside working_dir"),
])
def test_configs_must_travel_with_the_job(tmp_path, entrypoint, extra, words):
    config = _tiny_config(tmp_path)
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"entrypoint: {entrypoint.format(config=config)}\n"
                    f"{extra.format(config=config)}runtime_env: {{working_dir: {tmp_path}}}\n")
    if words is None:
        load(spec)
        return
    with pytest.raises(ConfigError) as error:
        load(spec)
    assert words in str(error.value) and "\n" not in str(error.value)


def test_without_working_dir_only_shipped_names_and_cluster_paths_pass(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("entrypoint: aigc-ray train configs/mine.yaml\n"
                    "runtime_env: {working_dir: null}\n")
    with pytest.raises(ConfigError, match="uploads no working_dir"):
        load(spec)
    spec.write_text("entrypoint: aigc-ray train /mnt/cluster_storage/cfg.yaml\n"
                    "runtime_env: {working_dir: null}\n")
    load(spec)  # a path on the cluster: nothing here to check it against


def test_config_arguments_split_as_the_cli_reads_them():
    assert split_config_args([]) == (None, [])
    assert split_config_args(["tiny_cpu", "train.lr=1"]) == ("tiny_cpu", ["train.lr=1"])
    assert split_config_args(["train.lr=1"]) == (None, ["train.lr=1"])
    with pytest.raises(ConfigError, match="only the first argument may name a config"):
        split_config_args(["tiny_cpu", "other.yaml"])


def test_address_flag_wins_over_ray_address(monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")
    with pytest.raises(ConfigError) as error:  # Ray alone would try RAY_ADDRESS instead
        client(closed)
    assert f"Failed to connect to Ray at address: {closed}." in str(error.value)
    assert os.environ["RAY_ADDRESS"] == "http://127.0.0.1:1"  # put back
    with pytest.raises(ConfigError, match="RAY_ADDRESS=http://127.0.0.1:1"):
        client(None)


@pytest.mark.parametrize("action", ["status", "logs", "stop", "delete"])
def test_job_actions_need_a_job_id_before_any_cluster_is_asked(action):
    with pytest.raises(ConfigError, match=f"aigc-ray jobs {action} needs a JOB_ID"):
        job_command(action, None, "http://127.0.0.1:1", follow_logs=False)


def test_shell_chains_are_split_into_commands():
    chain = "aigc-ray sample-data d && python -m aigc_ray train tiny_cpu; echo done"
    assert aigc_commands(chain) == [["sample-data", "d"], ["train", "tiny_cpu"]]
    assert shlex.split("a 'b c'") == ["a", "b c"]
    with pytest.raises(ConfigError, match="unbalanced quotes"):
        aigc_commands("aigc-ray train 'tiny_cpu")
