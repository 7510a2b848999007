"""The pieces of training that need no Ray cluster: the schedule, the resource check, the step
count, the batch collation, the loop state a checkpoint keeps, the object store budget for
tokenized blocks, the data-wait clock and the compile fallback. The run folder's metrics, the
console lines and the MFU arithmetic are in test_metrics.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aigc_ray.config import load_config
from aigc_ray.data.cache import cache_budget, epochs_likely
from aigc_ray.errors import ConfigError, DataError, UserError
from aigc_ray.run_folder import CheckpointFolder
from aigc_ray.tokenizer import IGNORE_INDEX
from aigc_ray.train.driver import training_resource_warning
from aigc_ray.train.feed import (
    accumulation,
    batch_collator,
    count_steps,
    global_batch,
    global_batch_note,
    rank_share,
)
from aigc_ray.train.loop import LoopState, lr_factor
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
    # An elastic run starts with scaling.min_workers: one worker and the pipeline fit.
    assert training_resource_warning(load_config("tiny_cpu", [
        "scaling.cpus_per_worker=1", "scaling.elastic=true"]), {"CPU": 2.0}) is None
    assert "lower scaling.min_workers" in training_resource_warning(load_config("tiny_cpu", [
        "scaling.cpus_per_worker=1", "scaling.elastic=true", "scaling.min_workers=2"]),
        {"CPU": 2.0})


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


# ── fewer workers after a preemption (elastic): the same blocks, the same global batch ───────


def steps_of(order, start: int, world_size: int, per_step: int) -> list[list[int]]:
    """The global batches (sorted block ids) `world_size` ranks make from `start`, each rank
    taking `per_step` blocks a step, as the loop's steps consume `rank_share`s."""
    shares = [list(rank_share(order, start, rank, world_size)) for rank in range(world_size)]
    steps = min(len(share) for share in shares) // per_step
    return [sorted(block for share in shares
                   for block in share[step * per_step:(step + 1) * per_step])
            for step in range(steps)]


def test_a_restart_with_fewer_workers_goes_on_from_the_same_block():
    """Two workers take 4 steps of 2 × 4 blocks (8 a step) of a 50-block epoch; one worker goes
    on from block 32 with twice the accumulation: its steps hold exactly the blocks two workers'
    steps would have, none twice, none skipped; so does a restart with two again."""
    order = np.random.default_rng(0).permutation(50)
    two = steps_of(order, 0, world_size=2, per_step=4)
    assert len(two) == 6 and sorted(sum(two, [])) == sorted(order[:48])
    after = steps_of(order, 32, world_size=1, per_step=8)
    assert after == two[4:]
    assert steps_of(order, 32, world_size=2, per_step=4) == two[4:]
    # Three workers cannot split 8 a step: the steps change, the blocks still do not repeat.
    three = steps_of(order, 32, world_size=3, per_step=2)
    assert not set(sum(three, [])) & set(sum(two[:4], []))


def test_accumulation_keeps_the_global_batch_with_fewer_workers_or_says_it_cannot():
    cfg = load_config("tiny_cpu", ["scaling.num_workers=4", "scaling.elastic=true",
                                   "train.batch_size=8", "train.grad_accum_steps=1"])
    assert [accumulation(cfg, n) for n in (4, 2, 1)] == [1, 2, 4]
    assert {global_batch(cfg, n) for n in (4, 2, 1)} == {32}
    assert global_batch_note(cfg, 2) is None
    assert accumulation(cfg, 3) == 1 and global_batch(cfg, 3) == 24
    note = global_batch_note(cfg, 3)
    assert "32 sequences cannot be kept with 3 of scaling.num_workers=4" in note
    assert "24 per step" in note and "\n" not in note


def test_min_workers_needs_elastic_and_at_most_num_workers():
    assert load_config("tiny_cpu", ["scaling.elastic=true", "scaling.min_workers=2"]
                       ).scaling.min_workers == 2
    with pytest.raises(ConfigError, match="scaling.min_workers applies only with "
                                          "scaling.elastic=true"):
        load_config("tiny_cpu", ["scaling.min_workers=2"])
    with pytest.raises(ConfigError, match="scaling.min_workers=3 is more than "
                                          "scaling.num_workers=2"):
        load_config("tiny_cpu", ["scaling.elastic=true", "scaling.min_workers=3"])


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
    state = LoopState(step=130, epoch=2, blocks_in_epoch=17 * 16, world_size=2)
    state.note_eval(2.5)
    state.note_eval(2.7)  # no gain
    saved = CheckpointFolder(tmp_path).training_state
    torch.save({"loop": state.state_dict()}, saved)
    restored = LoopState()
    restored.load_state_dict(torch.load(saved, weights_only=True)["loop"])
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
    path = CheckpointFolder(tmp_path).training_state
    torch.save(old, path)
    saved = torch.load(path, weights_only=True)
    state = LoopState()
    # as the loop reads it: 4 batches of this worker, each 2 workers × 8 blocks
    state.load_state_dict(saved.get("loop", saved), blocks_per_batch=2 * 8)
    assert state == LoopState(step=40, epoch=1, blocks_in_epoch=64, best_val_loss=3.25,
                              evals_without_gain=2)


# ── waiting for data ──────────────────────────────────────────────────────────────────────────────


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
    model = torch.nn.Linear(2, 2)
    same, warning = compiled(model, torch.device("cuda"))  # a CPU-only torch cannot run it
    assert same is model
    assert warning is not None and "\n" not in warning
    assert "train.compile" in warning and "training without it" in warning


def test_a_block_longer_than_the_models_context_fails_before_any_worker(tmp_path):
    """The context length is read by the one function serving uses (tokenizer.context_length),
    so a GPT-2 config's `n_positions` counts as Llama's `max_position_embeddings` does."""
    from transformers import GPT2Config

    from aigc_ray.train.driver import check_model_settings

    GPT2Config(n_positions=64, n_layer=2).save_pretrained(tmp_path)
    check_model_settings(load_config(None, ["data.block_size=64"]), str(tmp_path))
    with pytest.raises(ConfigError, match="data.block_size is 128 but the model takes at most 64"):
        check_model_settings(load_config(None, ["data.block_size=128"]), str(tmp_path))
