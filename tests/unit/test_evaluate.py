"""eval checks that run before Ray starts, the report table, and the evaluation after training."""

import json

import pytest

from aigc_ray.cli import main
from aigc_ray.config import load_config
from aigc_ray.errors import ConfigError
from aigc_ray.evaluate import eval_data, evaluate_after_training, format_report
from aigc_ray.run_folder import RunFolder
from aigc_ray.train.driver import TrainSummary


def test_eval_data_reads_a_file_whole_and_needs_a_split_otherwise(tmp_path):
    cfg = load_config()  # prompt/completion pairs, val_fraction 0.1
    same, split = eval_data(cfg, None)
    assert same is cfg and split == "val"
    text, split = eval_data(cfg, str(tmp_path / "held_out.txt"))
    assert split is None and text.data.format == "text" and not text.data.supervised
    with pytest.raises(ConfigError, match="pass --data FILE"):
        eval_data(load_config(None, ["data.val_fraction=0"]), None)


def test_report_table_shows_both_models_and_the_difference():
    report = {"data": {"path": ["held_out.jsonl"], "split": "all"},
              "model": {"model": "/r/run/final", "perplexity": 2.5, "tokens": 1234,
                        "rouge_l": 40.0, "bleu": 12.5, "generated": 10},
              "baseline": {"model": "/m/base", "perplexity": 800.0, "tokens": 1200,
                           "rouge_l": 1.0, "bleu": 0.1, "generated": 10}}
    report["difference"] = {"perplexity": -797.5, "rouge_l": 39.0, "bleu": 12.4}
    table = format_report(report)
    assert "1,234 tokens scored, 10 completions generated" in table
    assert "run/final" in table and "baseline m/base" in table
    assert "-797.50" in table and "+39.00" in table and "+12.40" in table
    assert json.dumps(report)  # eval.json is this dict


def test_evaluation_after_training_scores_final_against_the_start_into_the_run_folder(
        tmp_path, monkeypatch, capsys):
    run = RunFolder(tmp_path)
    summary = TrainSummary(run_dir=run.path, final_dir=run.final, steps=10,
                           total_steps=10, val_perplexity_before=9.0, val_perplexity_after=2.0,
                           samples=[], start_model="/models/start")
    calls = []
    monkeypatch.setattr("aigc_ray.evaluate.run_eval",
                        lambda *args, **kwargs: calls.append((args, kwargs)) or {"model": {}})
    assert evaluate_after_training(load_config(None, ["eval.after_training=false"]), summary) is None
    assert evaluate_after_training(load_config(None, ["data.val_fraction=0"]), summary) is None
    assert calls == [] and capsys.readouterr().out == ""

    cfg = load_config()
    assert evaluate_after_training(cfg, summary) == {"model": {}}
    assert calls == [((str(run.final), cfg), {"baseline": "/models/start",
                                              "output": run.eval_report})]
    assert capsys.readouterr().out == ("[aigc-ray] evaluating final/ against the starting model "
                                       "on the validation split\n")


def test_cli_eval_rejects_a_missing_checkpoint_before_ray_starts(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
