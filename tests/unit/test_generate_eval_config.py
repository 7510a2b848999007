"""generate/eval settings and checks that run before Ray starts, and the eval report table."""

import json

import pytest

from aigc_ray.checkpoint import checkpoint_config
from aigc_ray.cli import main
from aigc_ray.config import load_config
from aigc_ray.errors import ConfigError
from aigc_ray.evaluate import eval_data, evaluate_after_training, format_report
from aigc_ray.generate import (
    GENERATE_KEYS,
    check_generate,
    count_input_rows,
    input_format,
    progress_line,
    resource_warning,
    row_seed,
)
from aigc_ray.train import TrainSummary


def test_input_format_follows_the_extension_unless_set():
    assert input_format(["a/b.jsonl"], "auto") == "jsonl"
    assert input_format(["s3://bucket/p.parquet"], "auto") == "parquet"
    assert input_format(["notes.txt"], "auto") == "text"
    assert input_format(["prompts.csv"], "text") == "text"
    with pytest.raises(ConfigError, match="generate.input_format"):
        input_format(["prompts.csv"], "auto")


def test_generate_refuses_a_missing_input_and_a_used_output(tmp_path):
    cfg = load_config()
    with pytest.raises(ConfigError, match="--input .* does not exist"):
        check_generate(str(tmp_path / "nope.jsonl"), str(tmp_path / "out"), cfg)
    source = tmp_path / "p.jsonl"
    source.write_text('{"prompt": "hi"}\n')
    used = tmp_path / "used"
    used.mkdir()
    (used / "part-0.parquet").write_text("x")
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        check_generate(str(source), str(used), cfg)
    assert check_generate(str(source), str(tmp_path / "new"), cfg) == [str(source)]


def test_generate_overrides_are_generate_keys_only(tiny_model_dir):
    path, cfg = checkpoint_config(tiny_model_dir, ["generate.batch_size=4"], GENERATE_KEYS,
                                  "generate")
    assert cfg.generate.batch_size == 4 and cfg.generate.temperature == 0.0
    for bad, words in [(["train.lr=1"], "generate.key=value"),
                       (["generate.temprature=1"], "did you mean generate.temperature"),
                       (["generate.top_p=0"], "generate.top_p must be > 0")]:
        with pytest.raises(ConfigError, match=words):
            checkpoint_config(tiny_model_dir, bad, GENERATE_KEYS, "generate")


def test_a_cluster_too_small_for_the_actors_and_the_io_warns():
    two = load_config(None, ["generate.concurrency=2"])
    assert "generate.concurrency 2" in resource_warning(two, {"CPU": 2})
    assert resource_warning(load_config(), {"CPU": 2}) is None  # the default: one actor
    assert resource_warning(load_config(None, ["generate.concurrency=2",
                                               "generate.cpus_per_actor=0.75"]), {"CPU": 2}) is None


def test_row_seed_depends_on_seed_and_id_only():
    assert row_seed(0, "a") == row_seed(0, "a") != row_seed(0, "b") != row_seed(1, "b")


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
    summary = TrainSummary(run_dir=tmp_path, final_dir=tmp_path / "final", steps=10,
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
    assert calls == [((str(tmp_path / "final"), cfg), {"baseline": "/models/start",
                                                       "output": tmp_path / "eval.json"})]
    assert capsys.readouterr().out == ("[aigc-ray] evaluating final/ against the starting model "
                                       "on the validation split\n")


def test_cli_eval_rejects_a_missing_checkpoint_before_ray_starts(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_progress_line_counts_rows_against_the_input_total(tmp_path):
    source = tmp_path / "p.txt"
    source.write_text("a\n\nb\nc")  # four rows: the blank one is skipped, the last has no \n
    assert count_input_rows([str(source)], "text") == 4
    assert count_input_rows(["s3://bucket/p.txt"], "text") is None
    line = progress_line({"generated": 30, "skipped.empty_text": 10}, 100, 10.0)
    assert line == ("[aigc-ray] generated 30/100 rows (40%, about 20 s left) | 10 skipped | "
                    "3.0 completions/s")
    assert "generated 5 rows | 0 skipped" in progress_line({"generated": 5}, None, 1.0)
