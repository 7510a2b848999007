"""Every `aigc-ray` command with bad input: an unknown key, a bad value, a missing file or
checkpoint, a missing argument. Each must fail before Ray starts (Ray is not initialized after
it), with exit code 2, one line on stderr naming what to change and no traceback. The whole
table runs through `main` in one separate process (a process per case cost a second or three of
imports each; in this process the commands would leave state behind, such as logging handlers
bound to a closed capture stream); the installed `aigc-ray` entry point is run as a user runs
it, in a process of its own, for a few."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aigc_ray.cli import COMMANDS, main
from aigc_ray.errors import ConfigError
from aigc_ray.run_folder import CheckpointFolder, RunFolder

REPO = Path(__file__).resolve().parents[2]
AIGC_RAY = Path(sys.executable).parent / "aigc-ray"

# (argv with {placeholders} from `places`, words the one error line must hold)
BAD_INPUTS = [
    (["config", "train.lrr=1"], "train.lrr is not a known key"),
    (["config", "train.lr=-1"], "train.lr must be > 0.0, got -1"),
    (["config", "nope.yaml"], "config 'nope.yaml' is neither a file nor a shipped config"),
    (["config", "{bad_yaml}"], "is not valid YAML"),
    (["config", "tiny_cpu", "other.yaml"], "'other.yaml' is not key=value"),
    (["config", "--verbose"], "unrecognized arguments: --verbose"),
    (["data", "scaling.num_workerz=2"], "did you mean scaling.num_workers?"),
    (["data", "data.path=/nonexistent/corpus.jsonl"],
     "data.path /nonexistent/corpus.jsonl does not exist"),
    (["train", "train.max_steps=0"], "train.max_steps must be >= 1, got 0"),
    (["train", "train.lr=fast"], "train.lr must be a number, got 'fast'"),
    (["train", "data.path=/nonexistent/corpus.jsonl"],
     "data.path /nonexistent/corpus.jsonl does not exist"),
    (["tune", "tiny_tune", "tune.num_samples=0"], "tune.num_samples must be >= 1, got 0"),
    (["tune", "tiny_tune", "tune.search_space={{train.lrr: {{choice: [1]}}}}"],
     "tune.search_space key train.lrr is not a config value to search"),
    (["tune", "tiny_tune", "data.path=/nonexistent/corpus.jsonl"],
     "data.path /nonexistent/corpus.jsonl does not exist"),
    (["sample-data"], "the following arguments are required: DIR"),
    (["sample-data", "{file}"], "cannot write the sample corpus to"),
    (["sample-data", "{tmp}/corpus", "--pairs", "0"], "--pairs must be at least 1, got 0"),
    (["sample-data", "{tmp}/corpus", "--pairs", "many"], "invalid int value: 'many'"),
    (["serve"], "the following arguments are required: CHECKPOINT"),
    (["serve", "/nonexistent/final"], "checkpoint /nonexistent/final does not exist"),
    (["serve", "{checkpoint}", "serve.prot=8001"], "did you mean serve.port?"),
    (["serve", "{checkpoint}", "serve.port=-1"], "serve.port must be >= 1, got -1"),
    (["serve", "{checkpoint}", "train.lr=1"], "takes serve.key=value"),
    (["serve", "{file}"], "is not a Hugging Face model folder (no config.json)"),
    (["serve", "{not_a_model}"], "its config.json names no model_type"),
    (["generate", "{checkpoint}", "--output", "{tmp}/out"],
     "the following arguments are required: --input"),
    (["generate", "/nonexistent/final", "--input", "{prompts}", "--output", "{tmp}/out"],
     "checkpoint /nonexistent/final does not exist"),
    (["generate", "{not_a_model}", "--input", "{prompts}", "--output", "{tmp}/out"],
     "is not a Hugging Face model folder"),
    (["generate", "{checkpoint}", "--input", "/nonexistent/prompts.jsonl", "--output",
      "{tmp}/out"], "--input /nonexistent/prompts.jsonl does not exist"),
    (["generate", "{checkpoint}", "--input", "{prompts}", "--output", "{tmp}/out",
      "generate.batch_size=0"], "generate.batch_size must be >= 1, got 0"),
    (["eval"], "the following arguments are required: CHECKPOINT"),
    (["eval", "/nonexistent/final"], "checkpoint /nonexistent/final does not exist"),
    (["eval", "{checkpoint}"],
     f"has no {CheckpointFolder(Path()).config.name} naming the data it was trained on"),
    (["eval", "{not_a_model}"], "its config.json names no model_type"),
    (["eval", "{checkpoint}", "--data", "/nonexistent/rows.jsonl"],
     "data.path /nonexistent/rows.jsonl does not exist"),
    (["eval", "{checkpoint}", "eval.generate_rowz=1"], "did you mean eval.generate_rows?"),
    (["eval", "{checkpoint}", "--limit", "5"], "--limit and --url go with --harness TASKS"),
    (["eval", "{checkpoint}", "--harness", "/nonexistent/task.yaml"],
     "harness task file /nonexistent/task.yaml does not exist"),
    (["eval", "{checkpoint}", "--harness", "{checkpoint}"], "holds no .yaml task files"),
    (["eval", "{checkpoint}", "--harness", "{bad_yaml}"], "cannot be read"),
    (["eval", "{checkpoint}", "--harness", "{typo_spec}"], "has no `task:` name"),
    (["eval", "{checkpoint}", "--harness", "{typo_spec}", "--limit", "0"],
     "--limit must be a count of documents"),
    (["eval", "{checkpoint}", "--harness", "{typo_spec}", "--url", "localhost:8000"],
     "--url must be the server's base URL"),
    (["eval", "{checkpoint}", "--harness", "{task}", "--url", "{closed}"],
     "cannot list the models at http://127.0.0.1:"),
    (["submit"], "the following arguments are required: JOBSPEC"),
    (["submit", "/nonexistent/spec.yaml"], "job spec /nonexistent/spec.yaml does not exist"),
    (["submit", "{typo_spec}"], "did you mean entrypoint?"),
    (["submit", "jobs/train_tiny_cpu.yaml", "train.lrr=1"], "did you mean train.lr?"),
    (["jobs"], "the following arguments are required: action"),
    (["jobs", "frob"], "invalid choice: 'frob'"),
    (["jobs", "status"], "aigc-ray jobs status needs a JOB_ID"),
    (["jobs", "list", "--address", "{closed}"], "cannot reach the Ray job API at"),
    ([], "the following arguments are required: COMMAND"),
    (["trian"], "invalid choice: 'trian'"),
    (["train", "model.name_or_path=/nonexistent/model", "train.max_steps=1"],
     "model.name_or_path /nonexistent/model does not exist"),
    # A hub id that does not exist, or any hub id the network cannot reach (offline): the reason
    # in one line, not transformers' traceback from a worker.
    (["train", "model.name_or_path=no-such-org/no-such-model", "train.max_steps=1"],
     "model.name_or_path no-such-org/no-such-model: "),
    (["data", "model.name_or_path=no-such-org/no-such-model", "data.path={prompts}"],
     "model.name_or_path no-such-org/no-such-model: "),
    (["train", "model.name_or_path={tmp}", "train.max_steps=1"], "model.name_or_path "),
    (["train", "run.name=..", "train.max_steps=1"],
     "run.name '..' would not be a folder inside run.output_dir"),
    (["config", "run.name=."], "run.name '.' would not be a folder inside run.output_dir"),
    (["train", "run.trackers=[mlflow]", "run.mlflow_uri={file}/store"],
     "run.mlflow_uri: cannot create"),
    (["serve", "{checkpoint}", "serve.api_key_file={tmp}/missing"],
     "serve.api_key_file {tmp}/missing does not exist"),
    (["serve", "{checkpoint}", "serve.api_key_file={tmp}"], "cannot be read (Is a directory)"),
]



@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, str]:
    """What the {placeholders} in BAD_INPUTS name (every case fails before writing anything)."""
    tmp_path = tmp_path_factory.mktemp("places")
    checkpoint = CheckpointFolder(RunFolder(tmp_path).final)
    checkpoint.path.mkdir()  # enough for the checks that run before the model loads
    checkpoint.model_config.write_text('{"model_type": "gpt2"}')
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    CheckpointFolder(not_a_model).model_config.write_text("{}")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "Hello"}\n')
    (tmp_path / "file.txt").write_text("a file, not a folder\n")
    (tmp_path / "bad.yaml").write_text("train: {lr: [1\n")
    (tmp_path / "typo.yaml").write_text("entrypont: aigc-ray train tiny_cpu\n")
    (tmp_path / "task.yaml").write_text("task: a_task\ndataset_path: json\n")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    return {"tmp": str(tmp_path), "checkpoint": str(checkpoint.path),
            "not_a_model": str(not_a_model),
            "prompts": str(tmp_path / "prompts.jsonl"), "file": str(tmp_path / "file.txt"),
            "bad_yaml": str(tmp_path / "bad.yaml"), "typo_spec": str(tmp_path / "typo.yaml"),
            "closed": closed, "task": str(tmp_path / "task.yaml")}


def aigc(*args: str) -> subprocess.CompletedProcess:
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    return subprocess.run([str(AIGC_RAY), *args], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=120, stdin=subprocess.DEVNULL)


# Runs each argv (JSON on stdin) through `main` with its own stdout and stderr; prints one JSON
# line after the marker: per case the exit code, what it printed, whether Ray was initialized.
TABLE_RUNNER = """
import contextlib, io, json, sys, traceback
import ray
from aigc_ray.cli import main
results = []
for argv in json.loads(sys.stdin.read()):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit:  # argparse's errors leave this way
            code = exit.code
        except Exception:  # what a user would see as a traceback
            traceback.print_exc(file=err)
            code = None
    results.append({"code": code, "out": out.getvalue(), "err": err.getvalue(),
                    "ray": ray.is_initialized()})
print("@@results@@" + json.dumps(results))
"""


@pytest.fixture(scope="module")
def bad_input_results(places) -> list[dict]:
    """BAD_INPUTS, each run through `main` in one process of their own, in table order."""
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    cases = [[arg.format(**places) for arg in argv] for argv, _ in BAD_INPUTS]
    done = subprocess.run([sys.executable, "-c", TABLE_RUNNER], input=json.dumps(cases),
                          cwd=REPO, env=env, text=True, capture_output=True, timeout=300)
    marked = [line for line in done.stdout.splitlines() if line.startswith("@@results@@")]
    assert done.returncode == 0 and marked, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(marked[0].removeprefix("@@results@@"))


@pytest.mark.parametrize("case", [
    pytest.param(i, id=" ".join(argv) or "(none)") for i, (argv, _) in enumerate(BAD_INPUTS)])
def test_bad_input_fails_with_one_line_and_exit_2(bad_input_results, places, case):
    words = BAD_INPUTS[case][1]
    result = bad_input_results[case]
    lines = result["err"].strip().splitlines()
    assert "Traceback" not in result["out"] + result["err"], result["err"][-3000:]
    assert result["code"] == 2, result["err"][-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result["err"][-3000:]
    assert words.format(**places) in lines[0]
    assert not result["ray"]  # it failed before Ray started


@pytest.mark.parametrize("argv", [["config", "train.lrr=1"], ["trian"],
                                  ["serve", "/nonexistent/final"]], ids=" ".join)
def test_the_installed_command_exits_2_with_one_line(argv):
    """What a shell sees: the entry point's exit status, one line on stderr, no traceback."""
    done = aigc(*argv)
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stdout + done.stderr, done.stderr[-3000:]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]


def test_every_command_has_a_bad_input_case():
    tried = {argv[0] for argv, _ in BAD_INPUTS if argv and not argv[0].startswith("tri")}
    assert tried == {command.name for command in COMMANDS}


def test_every_command_in_the_table_is_in_help_with_its_own_help():
    top = subprocess.run([str(AIGC_RAY), "--help"], text=True, capture_output=True, timeout=60)
    assert top.returncode == 0
    listed = [line.split()[0] for line in top.stdout.splitlines() if line.startswith("    ")
              and not line.startswith("     ")]
    assert listed == [command.name for command in COMMANDS]
    words = " ".join(top.stdout.split())  # argparse wraps the help lines
    for command in COMMANDS:
        assert f"{command.name} {command.help}" in words
        with pytest.raises(SystemExit) as done:
            main([command.name, "--help"])
        assert done.value.code == 0


def test_an_unreachable_ray_address_is_one_line(monkeypatch):
    import ray

    from aigc_ray import cluster

    def refuse(**_):
        raise ConnectionError("Failed to connect to Ray cluster.\nmore detail")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    with socket.socket() as server:  # answers TCP, so only ray.init finds it is no Ray cluster
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        monkeypatch.setenv("RAY_ADDRESS", address)
        with pytest.raises(ConfigError) as error:
            cluster.start_ray()
    assert str(error.value) == (f"cannot reach the Ray cluster at RAY_ADDRESS={address}: Failed "
                                "to connect to Ray cluster.; start it, or unset RAY_ADDRESS to "
                                "run on a local Ray")


# ── what counts as a user's error ────────────────────────────────────────────────────────────


def test_a_bug_raised_while_handling_a_user_error_keeps_its_traceback(monkeypatch, capsys):
    import aigc_ray.train.driver

    def handler_with_a_bug(cfg):
        try:
            raise ConfigError("train.lr must be > 0")
        except ConfigError:
            return {}["the handler's own bug"]  # KeyError, its context the user error

    monkeypatch.setattr(aigc_ray.train.driver, "run_train", handler_with_a_bug)
    with pytest.raises(KeyError):
        main(["train"])
    assert "error: train.lr" not in capsys.readouterr().err


def test_a_user_error_given_as_the_explicit_cause_is_one_line(monkeypatch, capsys):
    import aigc_ray.train.driver

    def wrapped(cfg):
        raise RuntimeError("a worker failed") from ConfigError("train.lr must be > 0, got -1")

    monkeypatch.setattr(aigc_ray.train.driver, "run_train", wrapped)
    assert main(["train"]) == 2
    assert capsys.readouterr().err == "error: train.lr must be > 0, got -1\n"


def test_a_user_error_on_a_training_worker_is_one_line():
    """Ray Train raises WorkerGroupError with each failed rank's error; the lowest rank's
    user error is the line (the driver adds its skipped-row counts to an empty split's)."""
    from ray.train import WorkerGroupError

    from aigc_ray.errors import DataError, user_error

    error = WorkerGroupError("rank 0, 1 failed", {1: DataError("rank one"),
                                                  0: DataError("the training split has too few")})
    assert user_error(error) == "the training split has too few"
    assert user_error(WorkerGroupError("bug", {0: KeyError("x")})) is None


def test_a_system_exit_without_ctrl_c_is_a_bug_not_a_stopped_run(monkeypatch, capsys):
    import aigc_ray.train.driver

    def exits(cfg):
        sys.exit(3)

    monkeypatch.setattr(aigc_ray.train.driver, "run_train", exits)
    with pytest.raises(RuntimeError, match=r"SystemExit\(3\) though no Ctrl-C or SIGTERM") as info:
        main(["train"])
    assert isinstance(info.value.__cause__, SystemExit)  # the traceback shows where it exited
    assert "training stopped" not in capsys.readouterr().err


def test_ctrl_c_during_training_says_how_to_resume(monkeypatch, capsys):
    # Ray Train's SIGINT handler aborts the run and leaves by sys.exit; a real SIGINT here.
    import signal

    import aigc_ray.train.driver

    def interrupted(cfg):
        signal.signal(signal.SIGINT, lambda *_: sys.exit(0))  # as Ray Train's handler does
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # the handler runs between bytecodes
            time.sleep(0.01)
        raise AssertionError("no SIGINT arrived")

    monkeypatch.setattr(aigc_ray.train.driver, "run_train", interrupted)
    on_sigint = signal.getsignal(signal.SIGINT)
    try:
        assert main(["train", "train.max_steps=5"]) == 130
    finally:
        signal.signal(signal.SIGINT, on_sigint)
    assert capsys.readouterr().err == ("training stopped; resume it from its last checkpoint "
                                       "with: aigc-ray train train.max_steps=5\n")
