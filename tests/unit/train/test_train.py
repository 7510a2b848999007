"""The pieces of training that need no Ray cluster: the schedule, the resource check, the step
count, the batch collation, the loop state a checkpoint keeps, the MFU arithmetic, the object
store budget for tokenized blocks, and the console lines the driver prints from a run folder
(real files, written as the workers write them)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aigc_ray.config import load_config
from aigc_ray.data.cache import cache_budget, epochs_likely
from aigc_ray.errors import DataError, UserError
from aigc_ray.tokenizer import IGNORE_INDEX
from aigc_ray.train.driver import training_resource_warning
from aigc_ray.train.feed import batch_collator, count_steps
from aigc_ray.train.loop import LoopState, lr_factor
from aigc_ray.train.metrics import (
    Follower,
    append_jsonl,
    flops_per_token,
    peak_tflops,
    read_jsonl,
    truncate_after,
)
from aigc_ray.train.prepare import compiled


def test_lr_warms_up_linearly_then_decays_to_the_floor():
    factors = [lr_factor(step, 100, 10, "cosine", 0.1) for step in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))  # never rises after warmup
    assert lr_factor(55, 100, 10, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(99, 100, 10, "constant", 0.1) == 1.0


def test_training_resource_warning_names_the_keys_to_change():
    assert training_resource_warning(load_config("tiny_cpu"), {"CPU": 2.0}) is None
    message = training_resource_warning(
        load_config("tiny_cpu", ["scaling.cpus_per_worker=1"]), {"CPU": 2.0})
    assert "need 2.5 CPUs" in message and "the cluster has 2 now" in message
    assert "scaling.cpus_per_worker" in message


def test_follower_prints_each_new_line_once_in_step_order(tmp_path):
    printed: list[str] = []
    with Follower(tmp_path, total_steps=20, interval_s=0.05, out=printed.append) as follower:
        append_jsonl(tmp_path / "workers" / "rank-0.jsonl", {
            "rank": 0, "start_step": 0, "world_size": 2, "num_nodes": 1, "device": "cpu",
            "total_steps": 20, "global_batch": 16, "strategy": "fsdp", "time": 1.0})
        append_jsonl(tmp_path / "workers" / "rank-0.jsonl", {  # not a start: not printed
            "rank": 0, "memory_at_step": 1, "parameter_bytes": 100, "time": 1.5})
        append_jsonl(tmp_path / "metrics.jsonl", {"step": 0, "epoch": 0, "loss": None, "lr": 0.0,
                                                  "tokens_per_second": None, "val_loss": 6.0,
                                                  "val_perplexity": 403.4})
        follower.poll()
        append_jsonl(tmp_path / "samples.jsonl", {"step": 10, "prompt": "Hi", "reply": "Hello"})
        append_jsonl(tmp_path / "metrics.jsonl", {"step": 10, "epoch": 0, "loss": 5.0,
                                                  "lr": 1e-3, "tokens_per_second": 1234.5,
                                                  "val_loss": 4.5, "val_perplexity": 90.0})
        for rank in (1, 0):  # a worker's note for the console: rank 0's only, after its step
            append_jsonl(tmp_path / "workers" / f"rank-{rank}.jsonl", {
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


# ── how many steps a run takes ──────────────────────────────────────────────────────────────


def test_count_steps_from_the_block_count_or_max_steps():
    epochs = load_config("tiny_cpu", ["train.max_steps=null", "train.epochs=3",
                                      "train.batch_size=8", "train.grad_accum_steps=2"])
    # 100 blocks over 2 workers: 50 each, 6 batches of 8, 3 optimizer steps of 2 micro-batches.
    assert count_steps(epochs, 100, 2) == (9, True)
    assert count_steps(epochs, 32, 1) == (6, True)
    capped = load_config("tiny_cpu", ["train.max_steps=25"])
    assert count_steps(capped, None, 2) == (25, False)  # max_steps needs no count


def test_count_steps_names_the_keys_when_the_split_is_too_small():
    cfg = load_config("tiny_cpu", ["train.max_steps=null", "train.batch_size=8"])
    with pytest.raises(DataError) as caught:
        count_steps(cfg, 15, 2)  # 7 blocks per worker: not one batch of 8
    assert isinstance(caught.value, UserError)  # the CLI prints it as one line, exit 2
    message = str(caught.value)
    assert "\n" not in message
    assert "15 blocks" in message and "train.batch_size 8" in message
    with pytest.raises(DataError):
        count_steps(cfg, 0, 1)
    # Accumulation makes a step need more blocks: the message names it too.
    accumulating = load_config("tiny_cpu", ["train.max_steps=null", "train.batch_size=8",
                                            "train.grad_accum_steps=4"])
    with pytest.raises(DataError, match="train.grad_accum_steps 4"):
        count_steps(accumulating, 20, 1)  # 2 batches: half a step
    # A max_steps run whose split was counted (it is cached) fails the same way, before Ray
    # Train starts, instead of looping over epochs that never make a step.
    with pytest.raises(DataError, match="15 blocks"):
        count_steps(load_config("tiny_cpu", ["train.max_steps=50", "train.batch_size=8"]), 15, 2)


# ── the object store budget for tokenized training blocks ───────────────────────────────────


def test_cache_budget_is_a_quarter_of_the_store_by_default():
    cfg = load_config("tiny_cpu")
    assert cfg.data.cache_max_bytes is None
    assert cache_budget(cfg, 8_000_000_000) == (2_000_000_000, None)


def test_cache_budget_keeps_what_the_user_asked_while_the_store_can_hold_it():
    cfg = load_config("tiny_cpu", ["data.cache_max_bytes=500000000"])
    assert cache_budget(cfg, 1_000_000_000) == (500_000_000, None)
    never = load_config("tiny_cpu", ["data.cache_max_bytes=0"])
    assert cache_budget(never, 1_000_000_000) == (0, None)  # 0: always stream, no warning


def test_cache_budget_too_big_for_the_store_streams_with_one_line_naming_the_key():
    cfg = load_config("tiny_cpu", ["data.cache_max_bytes=4000000000"])
    budget, warning = cache_budget(cfg, 1_000_000_000)
    assert budget == 0
    assert warning is not None and "\n" not in warning
    assert "data.cache_max_bytes" in warning and "streaming" in warning


def test_epochs_likely_when_max_steps_needs_more_tokens_than_the_corpus_holds(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("x" * 40_000)  # about 10,000 tokens at 4 bytes a token
    files = [str(corpus)]

    def run(max_steps, workers=1):
        cfg = load_config("tiny_cpu", [f"train.max_steps={max_steps}", "train.batch_size=8",
                                       "data.block_size=128"])
        return epochs_likely(cfg, files, workers)

    assert not run(5)  # 5 × 8 × 128 = 5,120 tokens: within one pass
    assert run(20)  # 20,480 tokens: the corpus is read twice
    assert run(5, workers=2)  # each worker takes its own batches: 10,240 tokens
    assert not epochs_likely(load_config("tiny_cpu", ["train.max_steps=null"]), files, 1)
    # A size that cannot be read cheaply (an object-store URI, a missing file): don't guess.
    assert not epochs_likely(load_config("tiny_cpu", ["train.max_steps=100000"]),
                             ["s3://bucket/corpus.jsonl"], 1)


# ── collation in Ray's prefetch threads ─────────────────────────────────────────────────────


def packed_batch(lengths: list[int], prompt_lengths: list[int], block_size: int = 32) -> dict:
    """Right-padded blocks as the tokenizer actors write them (int32/int8 numpy columns)."""
    rng = np.random.default_rng(0)
    rows = len(lengths)
    input_ids = np.zeros((rows, block_size), np.int32)
    mask = np.zeros((rows, block_size), np.int8)
    labels = np.full((rows, block_size), IGNORE_INDEX, np.int32)
    for i, (length, prompt) in enumerate(zip(lengths, prompt_lengths)):
        ids = rng.integers(1, 500, length)
        input_ids[i, :length], mask[i, :length] = ids, 1
        labels[i, prompt:length] = ids[prompt:]
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def test_collate_trims_to_a_multiple_of_8_and_counts_tokens_and_targets():
    batch = packed_batch(lengths=[5, 11, 9], prompt_lengths=[2, 4, 9])
    out = batch_collator(pin=False)(batch)
    assert out["input_ids"].shape == out["labels"].shape == (3, 16)  # longest 11 → 16 of 32
    assert out["input_ids"].dtype == out["labels"].dtype == torch.int64
    np.testing.assert_array_equal(out["input_ids"].numpy(), batch["input_ids"][:, :16])
    np.testing.assert_array_equal(out["labels"].numpy(), batch["labels"][:, :16])
    tokens, targets = out["counts"].tolist()
    assert tokens == int(batch["attention_mask"].sum()) == 25
    # Targets are the labels the next-token loss scores: every label after the first column.
    assert targets == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == 3 + 7 + 0
    assert "attention_mask" not in out  # right padding under causal attention needs no mask
    assert not out["input_ids"].is_pinned()


def test_collate_never_cuts_a_full_block():
    batch = packed_batch(lengths=[32, 3], prompt_lengths=[0, 0])
    out = batch_collator(pin=False)(batch)
    assert out["input_ids"].shape == (2, 32)
    assert out["counts"].tolist() == [35, 31 + 2]  # the first label is nobody's target


# ── the loop state a checkpoint keeps ───────────────────────────────────────────────────────


def test_loop_state_round_trips_through_a_checkpoint_file(tmp_path):
    state = LoopState(step=130, epoch=2, batches_in_epoch=17)
    state.note_eval(2.5)
    state.note_eval(2.7)  # no gain
    torch.save({"loop": state.state_dict()}, tmp_path / "training_state.pt")
    restored = LoopState()
    restored.load_state_dict(torch.load(tmp_path / "training_state.pt", weights_only=True)["loop"])
    assert restored == state
    assert (restored.best_val_loss, restored.evals_without_gain) == (2.5, 1)
    # Before any evaluation the best loss is infinite: it survives the file too.
    torch.save({"loop": LoopState(step=3).state_dict()}, tmp_path / "early.pt")
    early = LoopState()
    early.load_state_dict(torch.load(tmp_path / "early.pt", weights_only=True)["loop"])
    assert early == LoopState(step=3) and early.best_val_loss == math.inf


def test_loop_state_loads_a_checkpoint_saved_before_it_existed(tmp_path):
    """Runs checkpointed before LoopState kept its fields at the top level of the file."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    old = {"optimizer": optimizer.state_dict(), "scheduler": {"last_epoch": 40},
           "step": 40, "epoch": 1, "batches_in_epoch": 4, "best_val_loss": 3.25,
           "evals_without_gain": 2, "rng": torch.get_rng_state()}
    torch.save(old, tmp_path / "training_state.pt")
    saved = torch.load(tmp_path / "training_state.pt", weights_only=True)
    state = LoopState()
    state.load_state_dict(saved.get("loop", saved))  # as train_loop_per_worker reads it
    assert state == LoopState(step=40, epoch=1, batches_in_epoch=4, best_val_loss=3.25,
                              evals_without_gain=2)


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_data_wait_counts_only_the_part_of_a_wait_the_gpu_was_idle():
    """A step whose kernels run ~200 ms, then a batch that takes 300 ms to arrive: the GPU was
    idle for the last ~100 ms of the wait, not 300."""
    import time

    from aigc_ray.train.feed import WaitClock

    clock = WaitClock(torch.device("cuda"))
    torch.cuda._sleep(int(2e8))  # ~0.1-0.2 s of GPU time, by the clock rate
    clock.mark_step()

    def slow_batches():
        time.sleep(0.3)
        yield {}

    started = time.perf_counter()
    torch.cuda.synchronize()
    kernel_s = time.perf_counter() - started
    clock.waited = 0.0
    torch.cuda._sleep(int(2e8))
    clock.mark_step()
    clock.next(slow_batches())
    assert 0.3 - kernel_s - 0.05 < clock.waited < 0.3 - kernel_s + 0.05, (clock.waited, kernel_s)


# ── torch.compile ───────────────────────────────────────────────────────────────────────────


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where CUDA fails")
def test_compile_falls_back_with_one_line_where_the_device_cannot_compile():
    model = gpt2(tie=True)
    same, warning = compiled(model, torch.device("cuda"))  # a CPU-only torch cannot run it
    assert same is model
    assert warning is not None and "\n" not in warning
    assert "train.compile" in warning and "training without it" in warning
