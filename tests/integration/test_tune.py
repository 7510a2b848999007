"""Real Ray Tune searches whose trials are real DDP training runs (tiny model, sample corpus)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from aigc_ray.config import load_config
from aigc_ray.run_folder import CheckpointFolder, RunFolder
from aigc_ray.train.driver import preflight
from aigc_ray.train.metrics import read_jsonl, worker_starts
from aigc_ray.tune import PBT_STAGING, run_tune

pytestmark = pytest.mark.slow


def args_for(sample_corpus: dict, tiny_model_dir: str, output_dir) -> list[str]:
    """The shipped tiny_tune config pointed at the test corpus, tiny model and a folder. No
    sample replies at evaluations: no test here reads them (test_train's first test does)."""
    return [f"model.name_or_path={tiny_model_dir}", f"data.path={sample_corpus['jsonl']}",
            f"run.output_dir={output_dir}", "train.eval_batches=4", "train.sample_prompts=[]"]


@pytest.fixture
def tune_args(sample_corpus, tiny_model_dir, tmp_path):
    return args_for(sample_corpus, tiny_model_dir, tmp_path)


def results_of(run: RunFolder) -> list[dict]:
    with run.results.open() as f:
        return list(csv.DictReader(f))


def test_asha_stops_losers_exports_the_best_and_logs_each_trial_to_mlflow(ray_cluster,
                                                                        tune_args):
    """Two trials, one at a time, in grid order: a learning rate that learns (3e-3), then one
    too small to (1e-5). The second is behind the first at the first rung (measured: val_loss
    6.25 against 5.29 at step 10; 1e-5 barely moves it), so ASHA stops it there; the first
    runs to the end and is the best, exported to best/. The warmup is drawn, so
    best_config.yaml holds a sampled value too. The grid runs exactly its points, and each trial
    is its own MLflow run under the search's name."""
    from mlflow.tracking import MlflowClient

    cfg = load_config("tiny_tune", [
        *tune_args, "train.max_steps=30", "train.eval_every=10", "tune.num_samples=1",
        "tune.max_concurrent_trials=1", "run.name=asha", "run.trackers=[mlflow]",
        "tune.search_space={train.lr: {grid: [3.0e-3, 1.0e-5]}, "
        "train.warmup_steps: {randint: [0, 10]}}"])
    summary = run_tune(cfg)
    run = RunFolder(summary.run_dir)

    rows = results_of(run)
    assert len(rows) == 2 and all(row["status"] == "done" for row in rows)
    assert sorted(float(row["train.lr"]) for row in rows) == [1.0e-5, 3.0e-3]
    learns, stalls = sorted(rows, key=lambda row: -float(row["train.lr"]))
    assert (learns["stopped_early"], int(learns["steps"])) == ("False", 30), rows
    assert (stalls["stopped_early"], int(stalls["steps"])) == ("True", 10), rows  # ASHA cut it
    assert summary.best.trial == learns["trial"]
    assert summary.best.best == pytest.approx(float(learns["best_val_loss"]))
    assert summary.best.best < float(stalls["best_val_loss"])
    assert run.tune_curves.stat().st_size > 1000

    # Each trial is its own MLflow run, grouped under the search's name, in the store beside it,
    # with the values it ran with, its losses and its best loss, the stopped trial's too.
    client = MlflowClient(tracking_uri=f"sqlite:///{cfg.run.dir.parent}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("asha").experiment_id])
    by_trial = {row["trial"]: row for row in rows}
    assert sorted(r.info.run_name for r in runs) == sorted(by_trial)
    for mlflow_run in runs:
        row = by_trial[mlflow_run.info.run_name]
        assert float(mlflow_run.data.params["train.lr"]) == pytest.approx(float(row["train.lr"]))
        assert "val_loss" in mlflow_run.data.metrics
        # At the step Tune last heard of. A trial ASHA stops may evaluate once more before its
        # workers stop (the decision reaches them while they train on): MLflow has that
        # evaluation too, so its latest best can be lower (one clean-clone run of several).
        best_at = {metric.step: metric.value for metric in
                   client.get_metric_history(mlflow_run.info.run_id, "best_val_loss")}
        assert best_at[int(row["steps"])] == pytest.approx(float(row["best_val_loss"]), rel=1e-5)

    best = CheckpointFolder(run.best)
    assert not best.training_state.exists()
    model = AutoModelForCausalLM.from_pretrained(best.path)
    tokenizer = AutoTokenizer.from_pretrained(best.path)
    ids = tokenizer("Customer: Where is my order?\nAgent:", return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=5, do_sample=False).shape[1] > ids[
        "input_ids"].shape[1]

    # best_config.yaml is a complete config that `aigc-ray train` takes as it is: it validates,
    # and passes every check training makes before Ray starts (model, data files, trackers).
    again = load_config(str(run.best_config), ["train.max_steps=10"])
    assert again.train.lr == pytest.approx(float(learns["train.lr"]))
    assert again.train.warmup_steps == int(learns["train.warmup_steps"])
    assert again.run.name == "asha-best"
    assert len(preflight(again)) == 1  # the corpus file, found


def test_pbt_continues_the_worse_trial_from_the_better_ones_checkpoint(ray_cluster, tune_args):
    """Two trials, one at a learning rate too small to learn: at the perturbation it continues
    from the other's checkpoint (its steps and loss carry on from the donor's step) with a
    perturbed learning rate, which the restored optimizer really uses. One perturbation, at
    step 20, evaluations every 10: each exploit restarts a trial's workers (the costly part), and
    the evaluation after it shows the donor's weights. Synchronous PBT: the trial that gets to
    step 20 first waits for the other, so they are compared however far apart they started
    (asynchronous, a trial that started late met a finished one and nothing was exploited, in
    one clean-clone run of ten)."""
    cfg = load_config("tiny_tune", [
        *tune_args, "train.max_steps=30", "train.eval_every=10", "train.warmup_steps=0",
        "tune.pbt.perturbation_interval=20", "tune.pbt.synch=true",
        "tune.scheduler=pbt", "run.name=pbt", "tune.search_space={train.lr: {grid: [1.0e-5, 3.0e-3]}}",
        "scaling.cpus_per_worker=0.25"])
    summary = run_tune(cfg)
    run = RunFolder(summary.run_dir)

    rows = results_of(run)
    assert len(rows) == 2 and all(row["status"] == "done" for row in rows)
    exploited = [row for row in rows if row["exploited"] != "-"]
    assert exploited, rows
    for row in exploited:
        donor, step = row["exploited"].split(", ")[0].split("@")
        step = int(step)
        assert donor in {r["trial"] for r in rows} - {row["trial"]} and step > 0
        trial = run.trial(row["trial"])
        # Rank 0 started again from the donor's step, and the metrics carry on from there.
        assert step in [start["start_step"] for start in worker_starts(trial.path)]
        metrics = [r for r in read_jsonl(trial.metrics) if r["val_loss"] is not None]
        steps = [r["step"] for r in metrics]
        assert steps == sorted(set(steps)) and steps[-1] == 30
        before = [r["val_loss"] for r in metrics if 0 < r["step"] <= step]
        after = [r["val_loss"] for r in metrics if r["step"] > step]
        assert after and after[0] < before[-1]  # the donor's weights, not its own
    for row in rows:  # the learning rate the trial ended with is the one its optimizer used
        last = read_jsonl(run.trial(row["trial"]).metrics)[-1]
        assert last["lr"] == pytest.approx(0.1 * float(row["train.lr"]))  # cosine to 10%
        assert not (run.trial(row["trial"]).path / PBT_STAGING).exists()
        assert not list((run.path / row["trial"]).glob("checkpoint_*"))  # Tune's copies
    assert summary.table().splitlines()[0].rstrip().endswith("exploited (trial@step)")
    assert run.tune_curves.stat().st_size > 1000
    model = AutoModelForCausalLM.from_pretrained(run.best)
    assert model.config.n_layer == 2


SPACE = {"train.lr": (1.0e-4, 1.0e-2), "train.warmup_steps": (0, 40), "train.batch_size": (4, 8)}


def test_interrupted_search_resumes_without_rerunning_finished_trials(ray_cluster, tune_args,
                                                                      tmp_path):
    """Ctrl-C after a trial has finished, then --resume: the sampler picks up where it stopped,
    every trial's values lie in the declared space, none runs twice. With optuna, whose sampler
    has state to lose; `random` resumes through the same aigc-ray path (Tune pickles whichever
    searcher it has), so the suite runs it once, not twice (~80 s)."""
    args = ["tiny_tune", *tune_args, "train.max_steps=10", "train.eval_every=10",
            "tune.scheduler=fifo", "tune.num_samples=2", "tune.max_concurrent_trials=1",
            "tune.search_alg=optuna", "run.name=resume",
            "tune.search_space={train.lr: {loguniform: [1.0e-4, 1.0e-2]}, "
            "train.warmup_steps: {randint: [0, 40]}, train.batch_size: {choice: [4, 8]}}"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    run = RunFolder(tmp_path / "resume")
    first = subprocess.Popen([sys.executable, "-m", "aigc_ray", "tune", *args], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(first.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    # Tune has recorded a trial as finished once our callback prints that it ended.
    while not any(" ended at step" in line for line in lines) and first.poll() is None:
        assert time.monotonic() < deadline, "no trial finished in 300 s"
        time.sleep(0.2)
    first.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves the search state and stops
    first.wait(timeout=120)
    reader.join(timeout=10)
    out = "".join(lines)
    finished = {line.split()[2] for line in lines if " ended at step" in line}
    assert finished, out[-3000:]
    assert "--resume" in out, out[-3000:]  # says how to continue

    second = subprocess.run([sys.executable, "-m", "aigc_ray", "tune", *args, "--resume"],
                            env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    rows = results_of(run)
    assert len(rows) == 2 and all(row["status"] == "done" for row in rows)
    for row in rows:  # what the sampler drew follows the search space
        assert SPACE["train.lr"][0] <= float(row["train.lr"]) <= SPACE["train.lr"][1]
        low, high = SPACE["train.warmup_steps"]
        assert low <= int(row["train.warmup_steps"]) <= high
        assert int(row["train.batch_size"]) in SPACE["train.batch_size"]
    assert len({row["train.lr"] for row in rows}) == 2  # two draws, not one trial twice
    for trial in finished:  # trained once: one start per rank, never restarted
        assert len(worker_starts(run.trial(trial).path)) == 1
        assert [r["step"] for r in read_jsonl(run.trial(trial).metrics)] == [0, 10]
    assert (run.best / "model.safetensors").exists()


def test_a_finished_search_needs_resume_or_a_new_name(tune_args, tmp_path):
    """Checked before Ray starts: exit code 2 and one line naming what to change."""
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "tuner.pkl").write_bytes(b"")
    done = subprocess.run([sys.executable, "-m", "aigc_ray", "tune", "tiny_tune", *tune_args,
                           "run.name=taken"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "--resume" in done.stderr and "run.name" in done.stderr
    missing = subprocess.run([sys.executable, "-m", "aigc_ray", "tune", "tiny_tune", *tune_args,
                              "run.name=nothing", "--resume"], capture_output=True, text=True,
                             timeout=60)
    assert missing.returncode == 2 and "holds no search to resume" in missing.stderr
