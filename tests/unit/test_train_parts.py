"""The pieces of training that need no Ray: the schedule, the resource check, and the console
lines the driver prints from a run folder (real files, written as the workers write them)."""

from __future__ import annotations

import pytest

from aigc_ray.config import load_config
from aigc_ray.metrics import Follower, append_jsonl, read_jsonl, truncate_after
from aigc_ray.train import lr_factor, resource_warning


def test_lr_warms_up_linearly_then_decays_to_the_floor():
    factors = [lr_factor(step, 100, 10, "cosine", 0.1) for step in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))  # never rises after warmup
    assert lr_factor(55, 100, 10, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(99, 100, 10, "constant", 0.1) == 1.0


def test_resource_warning_names_the_keys_to_change():
    assert resource_warning(load_config("tiny_cpu"), {"CPU": 2.0}) is None
    message = resource_warning(load_config("tiny_cpu", ["scaling.cpus_per_worker=1"]),
                               {"CPU": 2.0})
    assert "need 2.5 CPUs" in message and "the cluster has 2 now" in message
    assert "scaling.cpus_per_worker" in message


def test_follower_prints_each_new_line_once_in_step_order(tmp_path):
    printed: list[str] = []
    with Follower(tmp_path, total_steps=20, interval_s=0.05, out=printed.append) as follower:
        append_jsonl(tmp_path / "workers" / "rank-0.jsonl", {
            "rank": 0, "start_step": 0, "world_size": 2, "num_nodes": 1, "device": "cpu",
            "total_steps": 20, "global_batch": 16, "time": 1.0})
        append_jsonl(tmp_path / "metrics.jsonl", {"step": 0, "epoch": 0, "loss": None, "lr": 0.0,
                                                  "tokens_per_second": None, "val_loss": 6.0,
                                                  "val_perplexity": 403.4})
        follower.poll()
        append_jsonl(tmp_path / "samples.jsonl", {"step": 10, "prompt": "Hi", "reply": "Hello"})
        append_jsonl(tmp_path / "metrics.jsonl", {"step": 10, "epoch": 0, "loss": 5.0,
                                                  "lr": 1e-3, "tokens_per_second": 1234.5,
                                                  "val_loss": 4.5, "val_perplexity": 90.0})
    assert printed == [
        "[aigc-ray] starting: 2 worker(s) on 1 node(s), cpu, 20 steps, global batch 16 sequences",
        "[aigc-ray] before training | val_loss 6.0000 | val_perplexity 403.40",
        "[aigc-ray] step 10/20 | epoch 0 | loss 5.0000 | lr 1.00e-03 | 1,234 tokens/s | "
        "val_loss 4.5000 | val_perplexity 90.00",
        "[aigc-ray] sample at step 10 | 'Hi' → 'Hello'",
    ]


def test_follower_skips_what_the_folder_held_before_a_resumed_run(tmp_path):
    append_jsonl(tmp_path / "metrics.jsonl", {"step": 0, "epoch": 0, "loss": None, "lr": 0.0,
                                              "tokens_per_second": None, "val_loss": 6.0,
                                              "val_perplexity": 403.4})
    printed: list[str] = []
    with Follower(tmp_path, total_steps=20, interval_s=0.05, out=printed.append):
        pass
    assert printed == []


def test_truncate_keeps_steps_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for step in (0, 10, 20, 30):
        append_jsonl(path, {"step": step})
    with path.open("a") as f:
        f.write('{"step": 4')  # a line cut off by a killed worker
    truncate_after(path, 20)
    assert [row["step"] for row in read_jsonl(path)] == [0, 10, 20]
    truncate_after(path, -1)  # a fresh start keeps nothing
    assert read_jsonl(path) == []
