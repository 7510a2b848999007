"""The strategy helpers the training loop uses, in one process (the 2-worker runs are in
tests/integration/test_train.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from aigc_ray.checkpoint import resolve_checkpoint
from aigc_ray.config import load_config
from aigc_ray.errors import ConfigError
from aigc_ray.run_folder import CheckpointFolder
from aigc_ray.train.driver import strategy_note
from aigc_ray.train.prepare import decay_groups, freeze_bottom
from aigc_ray.train.sharding import gradient_sync, lockstep, state_bytes


def small_model():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2,
                                      n_positions=32))


def test_state_bytes_counts_parameters_gradients_and_adamw_moments():
    model = small_model()
    freeze_bottom(model, 1)  # embeddings and block 0: no gradient, no optimizer state
    optimizer = torch.optim.AdamW(decay_groups(model, 0.1))
    ids = torch.randint(64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    held = state_bytes(model, optimizer)
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    assert held["parameter_bytes"] == 4 * sum(p.numel() for p in params)
    assert held["gradient_bytes"] == 4 * trainable
    assert held["optimizer_bytes"] == 2 * 4 * trainable  # exp_avg, exp_avg_sq (not `step`)
    assert held["trainable_parameters"] == trainable
    assert held["peak_process_bytes"] > held["parameter_bytes"]


def test_lockstep_in_one_process_yields_the_batches_as_they_are():
    assert list(lockstep([1, 2], lambda: 0, "cpu")) == [(1, True), (2, True)]
    assert list(lockstep([], lambda: 0, "cpu")) == []


def test_gradient_sync_skips_the_reduction_until_the_last_micro_step():
    class Ddp:
        def no_sync(self):
            return "no_sync"

    class Sharded:
        sync = None

        def set_requires_gradient_sync(self, sync):
            self.sync = sync

    assert gradient_sync(Ddp(), None, False, 2) == "no_sync"
    assert gradient_sync(Ddp(), None, True, 2) != "no_sync"
    assert gradient_sync(Ddp(), None, False, 1) != "no_sync"  # one worker: nothing to reduce
    sharded = Sharded()
    gradient_sync(None, sharded, False, 2)
    assert sharded.sync is False
    gradient_sync(None, sharded, True, 2)
    assert sharded.sync is True


def test_fsdp_with_one_worker_is_allowed_and_says_it_shards_nothing():
    assert strategy_note(load_config("tiny_cpu")) is None
    assert strategy_note(load_config("tiny_cpu", ["scaling.strategy=fsdp"])) is None
    note = strategy_note(load_config("tiny_cpu", ["scaling.strategy=fsdp",
                                                  "scaling.num_workers=1"]))
    assert "shards nothing" in note and "scaling.num_workers" in note


def test_a_sharded_checkpoint_is_not_served_directly(tmp_path):
    small_model().config.save_pretrained(tmp_path)
    CheckpointFolder(tmp_path).sharded.mkdir()
    with pytest.raises(ConfigError, match="holds FSDP shards .* pass the run folder or its "
                                          "final/ folder"):
        resolve_checkpoint(str(tmp_path))
