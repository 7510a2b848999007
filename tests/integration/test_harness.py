"""lm-evaluation-harness through our served model: the log-likelihoods it gets equal those its own
Hugging Face backend computes on the same checkpoint, and `aigc-ray eval --harness` puts the
scores in eval.json beside the baseline's. The tasks are the three `aigc-ray sample-data` writes
(conftest's sample corpus): multiple choice, a rolling log-likelihood (perplexity), and greedy
replies cut at stop strings."""

from __future__ import annotations

import copy
import json

import lm_eval
import pytest

from aigc_ray.cli import main
from aigc_ray.evaluate import load_eval_config
from aigc_ray.harness import harness_spec, run_harness, serve_running, served

pytestmark = pytest.mark.slow

LIMIT = 24  # documents per task: 96 multiple-choice requests, 24 rolling, 24 generations


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_model_dir):
    """The tiny model behind the same Serve app `aigc-ray serve` runs; its base URL."""
    path, cfg = load_eval_config(tiny_model_dir, ["serve.max_batch_size=8"])
    with serve_running() as port, served(str(path), cfg, port, name="harness-test") as url:
        yield url


@pytest.fixture(scope="module")
def tasks(sample_corpus) -> str:
    return ",".join(sample_corpus["harness"][name] for name in ("choice", "text", "reply"))


def by_doc(out: dict, task: str) -> list[dict]:
    return sorted(out["samples"][task], key=lambda sample: sample["doc_id"])


def test_scores_through_our_server_equal_lm_evals_own_hf_backend(server, tiny_model_dir, tasks):
    harness = harness_spec(tasks, LIMIT, None)
    ours = run_harness(server, tiny_model_dir, harness, concurrency=8, log_samples=True)
    theirs = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": tiny_model_dir, "dtype": "float32",
                                "device": "cpu"},
        tasks=copy.deepcopy(harness.tasks), limit=LIMIT, batch_size=8, log_samples=True)

    # Multiple choice: every choice's log-likelihood, and whether it is the greedy reply.
    choices = 0
    for mine, hf in zip(by_doc(ours, "support_choice"), by_doc(theirs, "support_choice"),
                        strict=True):
        for (got, got_greedy), (want, want_greedy) in zip(mine["filtered_resps"],
                                                          hf["filtered_resps"], strict=True):
            assert abs(got - want) < 1e-3, (mine["doc_id"], got, want)
            assert got_greedy == want_greedy
            choices += 1
    assert choices == 4 * LIMIT
    for metric in ("acc,none", "acc_norm,none"):  # exactly
        assert ours["results"]["support_choice"][metric] == \
            theirs["results"]["support_choice"][metric]

    # Rolling log-likelihood: each document's, and the perplexities made of them.
    for mine, hf in zip(by_doc(ours, "support_text"), by_doc(theirs, "support_text"),
                        strict=True):
        assert abs(mine["filtered_resps"][0] - hf["filtered_resps"][0]) < 1e-3
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert ours["results"]["support_text"][metric] == pytest.approx(
            theirs["results"]["support_text"][metric], rel=1e-4)

    # Generation (greedy, cut at the task's stop strings plus the EOS text): the same replies.
    replies = [(mine["filtered_resps"], hf["filtered_resps"]) for mine, hf in
               zip(by_doc(ours, "support_reply"), by_doc(theirs, "support_reply"), strict=True)]
    assert len(replies) == LIMIT and all(mine == hf for mine, hf in replies), replies[:3]
    assert ours["results"]["support_reply"]["exact_match,none"] == \
        theirs["results"]["support_reply"]["exact_match,none"]


def test_cli_scores_a_running_server_and_serves_the_baseline_beside_it(server, tiny_model_dir,
                                                                       sample_corpus, tmp_path):
    """`--url`: the model side through the server already running; the baseline is served here
    (on the same Serve) for its run. No config.yaml in the model folder: harness scores only."""
    report_path = tmp_path / "eval.json"
    choice = sample_corpus["harness"]["choice"]
    assert main(["eval", tiny_model_dir, "--harness", choice, "--limit", "12", "--url", server,
                 "--baseline", tiny_model_dir, "--output", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert "data" not in report and "perplexity" not in report["model"]
    assert report["harness"]["tasks"] == [choice] and report["harness"]["limit"] == 12
    assert report["harness"]["model"]["url"] == server
    assert report["harness"]["baseline"]["url"] is None  # served here
    for side in ("model", "baseline"):
        scores = report[side]["harness"]["support_choice"]
        assert scores["samples"] == 12 and 0 <= scores["acc"] <= 1 and "acc_stderr" in scores
    # The same weights on both sides: the same accuracy, whatever the batches held.
    assert report["difference"]["harness"]["support_choice"] == {"acc": 0.0, "acc_norm": 0.0}
