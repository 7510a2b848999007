"""The run folder's record of training (aigc_ray/train/metrics.py): JSON lines written and read
back as the workers and the driver do, on real files; the console lines the driver prints from
them, also while the files grow; the loss curve as a real PNG; the MFU arithmetic."""

from __future__ import annotations

import json
import time

import torch

from aigc_ray.run_folder import RunFolder
from aigc_ray.train.metrics import (
    Follower,
    append_jsonl,
    flops_per_token,
    peak_tflops,
    plot_loss_curve,
    progress_line,
    read_jsonl,
    restart_row,
    start_line,
    truncate_after,
)

BEFORE_TRAINING = {"step": 0, "epoch": 0, "loss": None, "lr": 0.0, "tokens_per_second": None,
                   "val_loss": 6.0, "val_perplexity": 403.4}


def metric(step: int, loss: float) -> dict:
    return {"step": step, "epoch": 0, "loss": loss, "lr": 1e-3, "tokens_per_second": 1000.0}


def start(start_step: int = 0, total_steps: int = 20, **extra) -> dict:
    return {"rank": 0, "start_step": start_step, "world_size": 2, "num_nodes": 1,
            "device": "cpu", "total_steps": total_steps, "global_batch": 16, "time": 1.0, **extra}


def wait_for(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the follower did not print in time"
        time.sleep(0.01)


# ── JSON lines ──────────────────────────────────────────────────────────────────────────────


def test_rows_appended_read_back_in_order_and_a_missing_file_reads_empty(tmp_path):
    run = RunFolder(tmp_path)
    assert read_jsonl(run.metrics) == []  # before rank 0 wrote anything
    rows = [BEFORE_TRAINING, metric(10, 5.0), metric(20, 4.0)]
    for row in rows:
        append_jsonl(run.metrics, row)
    append_jsonl(run.worker_log(3), start())  # creates workers/ on the way
    assert read_jsonl(run.metrics) == rows
    assert len(run.metrics.read_text().splitlines()) == 3  # one line per row
    assert read_jsonl(run.worker_log(3)) == [start()]


def test_a_line_still_being_written_is_not_read_until_it_is_whole(tmp_path):
    path = RunFolder(tmp_path).metrics
    append_jsonl(path, metric(10, 5.0))
    line = json.dumps(metric(20, 4.0))
    with path.open("a") as f:
        f.write(line[:12])
    assert [row["step"] for row in read_jsonl(path)] == [10]
    with path.open("a") as f:
        f.write(line[12:] + "\n")
    assert [row["step"] for row in read_jsonl(path)] == [10, 20]


def test_truncate_keeps_steps_up_to_the_checkpoint(tmp_path):
    path = RunFolder(tmp_path).metrics
    for step in (0, 10, 20, 30):
        append_jsonl(path, {"step": step})
    with path.open("a") as f:
        f.write('{"step": 4')  # a line cut off by a killed worker
    truncate_after(path, 20)
    assert [row["step"] for row in read_jsonl(path)] == [0, 10, 20]
    truncate_after(path, -1)  # a fresh start keeps nothing
    assert read_jsonl(path) == []
    truncate_after(RunFolder(tmp_path / "new").metrics, 10)  # nothing written yet: nothing made
    assert not (tmp_path / "new").exists()


# ── console lines ───────────────────────────────────────────────────────────────────────────


def test_progress_line_shows_what_the_interval_measured():
    row = {**metric(30, 3.25), "mfu": 0.412, "data_wait": 0.07, "val_loss": 3.5,
           "val_perplexity": 33.12}
    assert progress_line(row, 100) == (
        "[aigc-ray] step 30/100 | epoch 0 | loss 3.2500 | lr 1.00e-03 | 1,000 tokens/s | "
        "mfu 41.2% | data_wait 7% | val_loss 3.5000 | val_perplexity 33.12")
    # No known total (train.max_steps unset and the epoch length unknown), no mfu, no eval.
    assert progress_line(metric(30, 3.25)) == (
        "[aigc-ray] step 30 | epoch 0 | loss 3.2500 | lr 1.00e-03 | 1,000 tokens/s")
    assert progress_line(BEFORE_TRAINING, 100) == (
        "[aigc-ray] before training | val_loss 6.0000 | val_perplexity 403.40")


def test_a_restart_row_counts_the_steps_trained_past_its_checkpoint(tmp_path):
    """A run logged to step 30 and restarts from its step-20 checkpoint: 10 steps lost. One
    whose preemption notice saved step 34 (after its last log row) and trained no further: a
    preemption, nothing lost. A notice from before the last start does not count."""
    run = RunFolder(tmp_path)
    for row in (metric(10, 3.0), metric(20, 2.5), metric(30, 2.2)):
        append_jsonl(run.metrics, row)
    append_jsonl(run.worker_log(0), {"rank": 0, "preemption_checkpoint": 5, "time": 0.5})
    append_jsonl(run.worker_log(0), start(0, total_steps=40))
    row = restart_row(run, 20, 0, world_size=1, global_batch=16)
    assert row == {"step": 20, "epoch": 0, "event": "restart", "steps_lost": 10, "workers": 1,
                   "global_batch": 16}
    append_jsonl(run.worker_log(0), {"rank": 0, "preemption_checkpoint": 34, "time": 2.0})
    row = restart_row(run, 34, 0, world_size=1, global_batch=16)
    assert (row["event"], row["steps_lost"]) == ("preemption", 0)
    assert progress_line(row) == ("[aigc-ray] a preemption handled: step 34 goes on with 1 "
                                  "worker(s), global batch 16; 0 step(s) of training lost")


def test_start_line_says_fresh_start_resume_or_nothing_left_to_train():
    assert start_line(start()) == ("[aigc-ray] starting: 2 worker(s) on 1 node(s), cpu, ddp, "
                                   "20 steps, global batch 16 sequences")
    assert start_line(start(12, strategy="fsdp")).startswith(
        "[aigc-ray] resuming at step 12: 2 worker(s) on 1 node(s), cpu, fsdp, 20 steps")
    done = start_line(start(20))
    assert "already trained 20 steps" in done and "train.max_steps" in done
    assert "run.name" in done and "\n" not in done


# ── following a run folder ──────────────────────────────────────────────────────────────────


def test_follower_prints_each_new_line_once_in_step_order(tmp_path):
    run = RunFolder(tmp_path)
    printed: list[str] = []
    with Follower(tmp_path, total_steps=20, interval_s=0.05, out=printed.append) as follower:
        append_jsonl(run.worker_log(0), start(strategy="fsdp"))
        append_jsonl(run.worker_log(0), {  # not a start: not printed
            "rank": 0, "memory_at_step": 1, "parameter_bytes": 100, "time": 1.5})
        append_jsonl(run.metrics, BEFORE_TRAINING)
        follower.poll()
        append_jsonl(run.samples, {"step": 10, "prompt": "Hi", "reply": "Hello"})
        append_jsonl(run.metrics, {"step": 10, "epoch": 0, "loss": 5.0, "lr": 1e-3,
                                   "tokens_per_second": 1234.5, "val_loss": 4.5,
                                   "val_perplexity": 90.0})
        for rank in (1, 0):  # a worker's note for the console: rank 0's only, after its step
            append_jsonl(run.worker_log(rank), {
                "rank": rank, "note": f"[aigc-ray] profile: rank {rank}", "at_step": 10,
                "time": 2.0})
    assert printed == [
        "[aigc-ray] starting: 2 worker(s) on 1 node(s), cpu, fsdp, 20 steps, global batch 16 "
        "sequences",
        "[aigc-ray] before training | val_loss 6.0000 | val_perplexity 403.40",
        "[aigc-ray] step 10/20 | epoch 0 | loss 5.0000 | lr 1.00e-03 | 1,234 tokens/s | "
        "val_loss 4.5000 | val_perplexity 90.00",
        "[aigc-ray] sample at step 10 | 'Hi' → 'Hello'",
        "[aigc-ray] profile: rank 0",
    ]


def test_follower_skips_what_the_folder_held_before_a_resumed_run(tmp_path):
    append_jsonl(RunFolder(tmp_path).metrics, BEFORE_TRAINING)
    printed: list[str] = []
    with Follower(tmp_path, total_steps=20, interval_s=0.05, out=printed.append):
        pass
    assert printed == []


def test_follower_thread_prints_a_growing_file_as_it_grows_and_half_lines_once_whole(tmp_path):
    """No poll() by hand: the follower's own thread picks up each row while the run goes on."""
    path = RunFolder(tmp_path).metrics
    printed: list[str] = []
    with Follower(tmp_path, total_steps=30, interval_s=0.02, out=printed.append):
        for count, step in enumerate((10, 20), start=1):
            append_jsonl(path, metric(step, 6.0 - step / 10))
            wait_for(lambda count=count: len(printed) == count)
        line = json.dumps(metric(30, 2.5))
        with path.open("a") as f:  # a row caught mid-write: not printed, not lost
            f.write(line[:20])
        time.sleep(0.1)  # five intervals
        assert len(printed) == 2
        with path.open("a") as f:
            f.write(line[20:] + "\n")
        wait_for(lambda: len(printed) == 3)
    assert [text.split(" | ")[0] for text in printed] == [
        "[aigc-ray] step 10/30", "[aigc-ray] step 20/30", "[aigc-ray] step 30/30"]
    assert "loss 2.5000" in printed[-1]


# ── the loss curve ──────────────────────────────────────────────────────────────────────────


def test_loss_curve_is_a_png_of_the_run(tmp_path):
    from PIL import Image

    run = RunFolder(tmp_path / "tiny-cpu")
    run.path.mkdir()
    rows = [BEFORE_TRAINING] + [{**metric(step, 6 - step / 20), "val_loss": 6 - step / 25}
                                for step in (10, 20, 30)]
    plot_loss_curve(rows, run.loss_curve)
    with Image.open(run.loss_curve) as image:
        assert image.format == "PNG" and image.size == (700, 400)
        colours = len(image.convert("RGB").getcolors(maxcolors=700 * 400))
    assert colours > 10  # lines, labels and a legend, not a blank canvas


# ── model FLOPs utilisation ─────────────────────────────────────────────────────────────────


def test_peak_tflops_tells_apart_gpus_whose_names_overlap():
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0  # the SXM part
    assert peak_tflops("NVIDIA L4") == 121.0
    assert peak_tflops("NVIDIA L40S") == 362.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA A10") == 125.0
    assert peak_tflops("NVIDIA GeForce RTX 3060") is None
    assert peak_tflops("") is None


def test_peak_tflops_never_lends_one_gpu_the_peak_of_another():
    # Neither is in the table: an unknown GPU must give None (mfu then needs
    # scaling.peak_tflops), not the number of a different chip.
    assert peak_tflops("NVIDIA L40") in (None, 181.0)
    assert peak_tflops("NVIDIA RTX A1000 Laptop GPU") is None


def gpt2(tie: bool):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=64, n_embd=16, n_layer=3,
                                      n_head=2, bos_token_id=0, eos_token_id=0,
                                      tie_word_embeddings=tie))


def gpt2_flops_by_hand(vocab: int, width: int, layers: int, context: int) -> int:
    """nanoGPT's estimate: 6 FLOPs per parameter that a token passes through a matmul with
    (the position table is a lookup; the tied token table is the output head's matmul), plus
    attention's 12 · layers · width · context. Biases and norms are in nanoGPT's count too."""
    d = width
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + 2 * 2 * d
    params = layers * block + 2 * d + vocab * d  # blocks, ln_f, the output head
    return 6 * params + 12 * layers * d * context


def test_flops_per_token_of_a_tied_gpt2_matches_the_count_by_hand():
    assert flops_per_token(gpt2(tie=True), 64) == gpt2_flops_by_hand(100, 16, 3, 64)
    assert (flops_per_token(gpt2(tie=True), 128) - flops_per_token(gpt2(tie=True), 64)
            == 12 * 3 * 16 * 64)


def test_flops_per_token_counts_an_untied_output_head_once():
    # Untied, the same model has the same matmuls: only the head's weight is its own tensor.
    assert flops_per_token(gpt2(tie=False), 64) == gpt2_flops_by_hand(100, 16, 3, 64)


def test_flops_per_token_counts_no_backward_below_frozen_layers():
    """train.freeze_layers=1 of 3: the forward runs everywhere; input gradients flow from the
    head down to block 1 only; weight gradients exist for blocks 1-2 and ln_f (the tied head
    froze with the token table)."""
    from aigc_ray.train.prepare import freeze_bottom

    model = gpt2(tie=True)
    freeze_bottom(model, 1)
    d, context, vocab = 16, 64, 100
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + 2 * 2 * d
    everything = 3 * block + 2 * d + vocab * d  # blocks, ln_f, the tied head's matmul
    above = 2 * block + 2 * d + vocab * d  # blocks 1-2, ln_f, the head
    trained = 2 * block + 2 * d
    assert flops_per_token(model, context) == (2 * everything + 2 * above + 2 * trained
                                               + 4 * 3 * d * context + 8 * 2 * d * context)
    assert flops_per_token(model, context) < gpt2_flops_by_hand(vocab, d, 3, context)


def test_flops_per_token_with_lora_takes_weight_gradients_of_the_adapters_only():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(gpt2(tie=True), LoraConfig(r=2, target_modules=["c_attn"],
                                                      task_type="CAUSAL_LM"))
    d, context, vocab = 16, 64, 100
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert adapters == 3 * (2 * d + 2 * 3 * d)  # A: r x d, B: 3d x r, in each of 3 blocks
    whole = gpt2_flops_by_hand(vocab, d, 3, context) // 6 - 12 * 3 * d * context // 6
    assert flops_per_token(model, context) == (4 * (whole + adapters) + 2 * adapters
                                               + 12 * 3 * d * context)


def test_flops_per_token_of_a_model_with_nothing_to_train_is_the_forward_alone():
    model = gpt2(tie=True)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    d, context, vocab = 16, 64, 100
    forward = gpt2_flops_by_hand(vocab, d, 3, context) // 3  # 2N + 4 · layers · d · context
    assert flops_per_token(model, context) == forward
