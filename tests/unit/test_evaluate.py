"""eval checks that run before Ray starts, the report table, and the evaluation after training."""

import json

import pytest

from aigc_ray.cli import main
from aigc_ray.config import load_config
from aigc_ray.errors import ConfigError
from aigc_ray.evaluate import differences, eval_data, evaluate_after_training, format_report
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


def test_harness_scores_sit_beside_the_baselines_with_their_differences():
    """--harness alone: no data rows, a row per task metric (stderrs and counts in eval.json
    only), the baseline and the difference beside each."""
    model = {"support_choice": {"acc": 0.9, "acc_stderr": 0.02, "samples": 200},
             "support_text": {"word_perplexity": 12.5, "bits_per_byte": 0.5, "samples": 100}}
    base = {"support_choice": {"acc": 0.25, "acc_stderr": 0.03, "samples": 200},
            "support_text": {"word_perplexity": 5000.0, "bits_per_byte": 3.0, "samples": 100}}
    report = {"model": {"model": "/r/run/final", "harness": model},
              "baseline": {"model": "/m/base", "harness": base},
              "harness": {"tasks": ["support.yaml"], "limit": None,
                          "model": {"seconds": 7.0}, "baseline": {"seconds": 7.5}}}
    report["difference"] = differences(report["model"], report["baseline"])
    assert report["difference"] == {"harness": {
        "support_choice": {"acc": pytest.approx(0.65)},
        "support_text": {"word_perplexity": -4987.5, "bits_per_byte": -2.5}}}
    lines = format_report(report).splitlines()
    assert lines[0] == "lm-evaluation-harness on support.yaml (7 s)"
    acc = next(line for line in lines if line.startswith("support_choice acc "))
    assert acc.split()[2:] == ["0.9000", "0.2500", "+0.6500", "(higher", "is", "better)"]
    ppl = next(line for line in lines if line.startswith("support_text word_perplexity"))
    assert "12.50" in ppl and "-4987.50" in ppl and "lower is better" in ppl
    assert not any("stderr" in line or "samples" in line for line in lines)


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
