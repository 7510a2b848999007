"""A real 2-worker DDP fine-tune on the sample corpus (real local Ray, tiny model, fixed seed)."""

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from aigc_ray.config import load_config
from aigc_ray.train import METRIC_KEYS, run_train


@pytest.mark.slow
def test_two_worker_run_lowers_val_loss_and_exports_final(ray_cluster, sample_corpus,
                                                          tiny_model_dir, tmp_path):
    cfg = load_config("tiny_cpu", [
        f"model.name_or_path={tiny_model_dir}", f"data.path={sample_corpus['jsonl']}",
        "train.max_steps=30", "train.eval_every=15", "train.log_every=5", "train.seed=0",
        f"run.output_dir={tmp_path}", "run.name=t2",
    ])
    summary = run_train(cfg)

    rows = [json.loads(line) for line in (summary.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(set(METRIC_KEYS) <= set(row) for row in rows)
    val = [row["val_loss"] for row in rows if row["val_loss"] is not None]
    assert rows[0]["step"] == 0 and rows[-1]["step"] == 30
    assert val[-1] < val[0] - 1.0, val  # more than a nat per token: a clear margin, not noise
    assert summary.val_perplexity_after < summary.val_perplexity_before
    assert (summary.run_dir / "loss_curve.png").stat().st_size > 1000

    final = summary.final_dir
    assert not (final / "training_state.pt").exists()
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    ids = tokenizer("Customer: I want a refund for my Orbit Watch.\nAgent:", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
