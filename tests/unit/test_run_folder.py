"""The run folder's names are a promise: users' run folders, scripts and the README name these
files, so a rename must fail here first."""

from pathlib import Path

from aigc_ray.run_folder import CheckpointFolder, RunFolder


def test_a_run_folder_names_its_files_as_the_readme_does():
    run = RunFolder(Path("runs/tiny-cpu"))
    names = {
        run.config: "config.yaml", run.metrics: "metrics.jsonl", run.samples: "samples.jsonl",
        run.workers: "workers", run.worker_log(3): "workers/rank-3.jsonl", run.profile: "profile",
        run.data_record: "data.json", run.final: "final", run.loss_curve: "loss_curve.png",
        run.eval_report: "eval.json", run.trials: "trials", run.results: "results.csv",
        run.tune_curves: "tune_curves.png", run.best: "best", run.best_config: "best_config.yaml",
        run.trial("abc_00000").metrics: "trials/abc_00000/metrics.jsonl",
    }
    for path, name in names.items():
        assert path == Path("runs/tiny-cpu") / name


def test_a_checkpoint_folder_keeps_the_config_and_training_state_beside_the_model():
    folder = CheckpointFolder(Path("runs/tiny-cpu/final"))
    assert [p.name for p in (folder.model_config, folder.config, folder.training_state,
                             folder.adapter, folder.eval_report)] == [
        "config.json", "config.yaml", "training_state.pt", "adapter", "eval.json"]


def test_worker_logs_lists_every_rank_in_order(tmp_path):
    run = RunFolder(tmp_path)
    for rank in (1, 0):
        run.worker_log(rank).parent.mkdir(exist_ok=True)
        run.worker_log(rank).write_text("{}\n")
    (run.workers / "notes.txt").write_text("not a rank's log")
    assert run.worker_logs() == [run.worker_log(0), run.worker_log(1)]
