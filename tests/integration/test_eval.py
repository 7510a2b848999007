"""Evaluation on real Ray Data: perplexity equals a direct transformers computation, and the CLI
writes eval.json with a baseline side by side; `aigc-ray train` ends with the evaluation of
final/ against its start. (That a fine-tune beats its starting model is asserted in
test_train.py.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from aigc_ray.cli import main
from aigc_ray.data.pipeline import check_config
from aigc_ray.evaluate import eval_data, load_eval_config, perplexity
from aigc_ray.run_folder import EVAL_FILE, RunFolder

pytestmark = pytest.mark.slow

PAIRS = ["data.prompt_field=prompt", "data.completion_field=completion"]


@pytest.fixture(scope="module")
def held_out(sample_corpus, tmp_path_factory):
    """40 prompt/completion pairs of the sample corpus in a file of their own."""
    with open(sample_corpus["jsonl"], encoding="utf-8") as f:
        lines = [line for _, line in zip(range(40), f)]
    path = tmp_path_factory.mktemp("held_out") / "pairs.jsonl"
    path.write_text("".join(lines))
    return path


def direct_perplexity(model_dir: str, pairs: list[dict]) -> float:
    """exp(mean loss over completion tokens), one pair at a time with plain transformers."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for pair in pairs:
            prompt = tokenizer(pair["prompt"])["input_ids"]
            completion = tokenizer(pair["completion"], add_special_tokens=False)["input_ids"]
            completion += [tokenizer.eos_token_id]
            ids = torch.tensor([prompt + completion])
            labels = torch.tensor([[-100] * len(prompt) + completion])
            loss = model(input_ids=ids, labels=labels).loss  # mean over the completion tokens
            total += float(loss) * len(completion)
            count += len(completion)
    return math.exp(total / count)


def test_perplexity_matches_a_direct_transformers_computation(ray_cluster, tiny_model_dir,
                                                              held_out):
    path, cfg = load_eval_config(tiny_model_dir, PAIRS)
    cfg, split = eval_data(cfg, str(held_out))
    ours = perplexity(str(path), cfg, split, check_config(cfg))
    pairs = [json.loads(line) for line in held_out.read_text().splitlines()]
    direct = direct_perplexity(tiny_model_dir, pairs)
    assert abs(ours["perplexity"] - direct) / direct < 1e-4, (ours, direct)
    assert ours["tokens"] == sum(
        len(AutoTokenizer.from_pretrained(tiny_model_dir)(p["completion"],
                                                          add_special_tokens=False)["input_ids"])
        + 1 for p in pairs)


def test_cli_writes_eval_json_with_a_baseline_side_by_side(ray_cluster, tiny_model_dir,
                                                           held_out, tmp_path, capsys):
    report_path = tmp_path / EVAL_FILE
    assert main(["eval", tiny_model_dir, *PAIRS, "eval.generate_rows=6", "eval.max_tokens=6",
                 "--data", str(held_out), "--baseline", tiny_model_dir,
                 "--output", str(report_path)]) == 0
    table = capsys.readouterr().out
    assert "perplexity" in table and "rouge_l" in table and "bleu" in table
    report = json.loads(report_path.read_text())
    assert report["model"]["generated"] == 6 and report["model"]["tokens"] > 0
    assert 0 <= report["model"]["rouge_l"] <= 100
    # The same model on both sides: every difference is exactly zero.
    assert report["difference"] == {"perplexity": 0.0, "rouge_l": 0.0, "bleu": 0.0}


def test_cli_without_data_needs_a_saved_config(tiny_model_dir, capsys):
    assert main(["eval", tiny_model_dir]) == 2
    # The last line: Ray may still forward an earlier test's actor output to stderr.
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "--data" in err


def test_cli_train_ends_with_the_evaluation_of_final_against_its_start(tracked_train_run,
                                                                       tiny_model_dir):
    """`aigc-ray train` evaluates after training (eval.after_training): the line announcing it,
    then the sample replies, the table and the summary line last; eval.json in the run folder.
    (conftest's tracked_train_run: 4 steps on one worker with trackers on, which test_trackers
    reads too.)"""
    lines = tracked_train_run["stdout"].splitlines()
    run = RunFolder(tracked_train_run["dir"])

    def first(prefix: str) -> int:
        return next(i for i, line in enumerate(lines) if line.startswith(prefix))

    assert (first("[aigc-ray] evaluating final/ against the starting model on the validation "
                  "split") < first("sample reply") < first("eval on ") < first("written to")
            == len(lines) - 2), lines[-30:]
    assert lines[-1].startswith("val_perplexity ")
    assert lines[-1].endswith(f"final model in {run.final}")
    assert lines[-2] == f"written to {run.eval_report}"
    report = json.loads(run.eval_report.read_text())
    assert report["model"]["model"] == str(run.final) and report["data"]["split"] == "val"
    assert report["baseline"]["model"] == str(Path(tiny_model_dir).resolve())
    assert report["model"]["generated"] == report["baseline"]["generated"] == 4
