"""run.trackers with the real libraries: one short `aigc-ray train` (conftest's
tracked_train_run, the evaluation at its end included) logs to TensorBoard, MLflow and W&B
(offline) at once, and each is read back through its own reader: every metrics.jsonl row at its
step, the config as parameters, the samples, the loss curve and the final evaluation."""

from __future__ import annotations

import json

import pytest

from aigc_ray.cli import main
from aigc_ray.run_folder import EVAL_FILE, RunFolder
from aigc_ray.train.metrics import read_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tracked_run(tracked_train_run):
    """conftest's run with every tracker on, and what it wrote beside them."""
    run_dir = tracked_train_run["dir"]
    return {**tracked_train_run, "rows": read_jsonl(RunFolder(run_dir).metrics),
            "ids": json.loads((run_dir / "trackers.json").read_text())}


def test_mlflow_has_every_row_the_config_and_the_artifacts(tracked_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tracked_run['out']}/mlflow.db")
    run = client.get_run(tracked_run["ids"]["mlflow"])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "aigc-ray"
    losses = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    expected = {row["step"]: row["loss"] for row in tracked_run["rows"] if row["loss"] is not None}
    assert losses == pytest.approx(expected)
    assert run.data.params["train.max_steps"] == "4" and run.data.params["data.block_size"] == "128"
    assert run.data.metrics["eval/model/perplexity"] > 0 and "best_val_loss" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {RunFolder(tracked_run["dir"]).loss_curve.name, EVAL_FILE, "samples"} <= artifacts


def test_tensorboard_event_files_hold_the_curves(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked_run["dir"] / "tensorboard"),
                              size_guidance={"scalars": 0, "images": 0}).Reload()
    losses = {e.step: e.value for e in events.Scalars("loss")}
    expected = {row["step"]: row["loss"] for row in tracked_run["rows"] if row["loss"] is not None}
    assert losses == pytest.approx(expected, rel=1e-6)
    assert [e.step for e in events.Scalars("val_loss")] == [0, 2, 4]
    assert "eval/model/rouge_l" in events.Tags()["scalars"]
    assert "loss_curve" in events.Tags()["images"]


def wandb_records(path) -> list[bytes]:
    """The records of a W&B transaction log (`run-ID.wandb`): a 7-byte header, then LevelDB log
    blocks of 32 KiB whose records are split into FULL/FIRST/MIDDLE/LAST fragments. (wandb 0.31
    reads them in its Go core; the Python reader it once had is gone.)"""
    import struct

    raw, records, pending, pos = path.read_bytes(), [], b"", 7
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):
            records.append(pending)
    return records


def test_wandb_runs_offline_under_the_run_folder(tracked_run):
    from wandb.proto import wandb_internal_pb2

    run_id = tracked_run["ids"]["wandb"]
    files = sorted((tracked_run["dir"] / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 3  # training, then the driver's loss curve, then its evaluation
    logged = {}
    for path in files:
        for data in wandb_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") == "history":
                items = {item.key or "/".join(item.nested_key): item.value_json
                         for item in record.history.item}
                logged.setdefault(int(items.get("_step", -1)), {}).update(items)
    expected = {row["step"]: row["loss"] for row in tracked_run["rows"] if row["loss"] is not None}
    assert {step: float(items["loss"]) for step, items in logged.items() if "loss" in items} == \
        pytest.approx(expected)
    assert "samples/path" in logged[2]  # the sample replies, as HTML media
    assert any("eval/model/perplexity" in items for items in logged.values())


def test_a_missing_tracker_library_fails_before_ray_starts(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    assert main(["train", "run.trackers=[wandb]"]) == 2
    assert "pip install 'aigc-ray[wandb]'" in capsys.readouterr().err


def test_an_mlflow_uri_naming_a_folder_holds_a_sqlite_store_inside_it(tmp_path, monkeypatch):
    # What most people type. MLflow 3 refuses a folder as a file store, which crashed rank 0;
    # the folder now holds a SQLite store, resolved where the config is read (a worker or a Tune
    # trial runs in another working folder).
    from mlflow.tracking import MlflowClient

    from aigc_ray.config import load_config
    from aigc_ray.train.trackers import check_trackers, open_trackers

    monkeypatch.chdir(tmp_path)
    cfg = load_config("tiny_cpu", ["run.trackers=[mlflow]", "run.mlflow_uri=tracking",
                                   f"run.output_dir={tmp_path}/runs", "run.name=folder"])
    check_trackers(cfg)  # before Ray starts: makes the folder
    assert (tmp_path / "tracking").is_dir()
    elsewhere = tmp_path / "worker"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg.run.dir.mkdir(parents=True)
    RunFolder(cfg.run.dir).eval_report.write_text('{"perplexity": 9.5}\n')
    trackers = open_trackers(cfg, cfg.run.dir)
    trackers.metrics({"step": 3, "loss": 1.5})
    trackers.files(RunFolder(cfg.run.dir).eval_report)
    trackers.close()

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/tracking/mlflow.db")
    run = client.get_run(json.loads((cfg.run.dir / "trackers.json").read_text())["mlflow"])
    assert run.info.status == "FINISHED" and run.data.params["run.name"] == "folder"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] \
        == [(3, 1.5)]
    # Artifacts beside the store, not in whatever folder the worker ran in.
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == [EVAL_FILE]
    assert list((tmp_path / "tracking" / "mlartifacts").rglob(EVAL_FILE))
    assert list(elsewhere.iterdir()) == []
