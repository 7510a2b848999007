"""The next-token loss shared by training and evaluation: how much padding a batch keeps, and
that the loss without an attention mask is the loss a user would compute with one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aigc_ray.tokenizer import IGNORE_INDEX
from aigc_ray.train.loss import PAD_MULTIPLE, token_loss_sum, trim_padding, trimmed_length


@pytest.mark.parametrize(("lengths", "block_size", "expected"), [
    ([5, 11, 9], 128, 16),  # the longest row, rounded up to a multiple of 8
    ([16, 3], 128, 16),  # already a multiple: no extra column
    ([17], 128, 24),
    ([123], 128, 128),  # rounds up to the block itself
    ([128, 128], 128, 128),
    ([10], 12, 12),  # rounding up past the block is capped at the block
    ([1], 128, 8),  # at least 2 columns (one input, one target), rounded up
    ([0, 0], 128, 8),  # all padding
    ([], 128, 8),  # an empty batch
    ([0], 4, 4),  # a block shorter than the multiple
])
def test_trimmed_length(lengths, block_size, expected):
    assert trimmed_length(np.array(lengths, dtype=np.int64), block_size) == expected
    # The evaluation path passes torch tensors: same answer.
    assert trimmed_length(torch.tensor(lengths, dtype=torch.int64), block_size) == expected
    assert expected % PAD_MULTIPLE == 0 or expected == block_size


def test_trim_padding_cuts_columns_and_makes_long_tensors():
    mask = torch.zeros((2, 32), dtype=torch.int8)
    mask[0, :10], mask[1, :3] = 1, 1
    batch = {"input_ids": torch.arange(64, dtype=torch.int32).reshape(2, 32),
             "attention_mask": mask,
             "labels": torch.full((2, 32), IGNORE_INDEX, dtype=torch.int32)}
    out = trim_padding(batch)
    assert {key: tuple(value.shape) for key, value in out.items()} == {
        "input_ids": (2, 16), "attention_mask": (2, 16), "labels": (2, 16)}
    assert all(value.dtype == torch.int64 for value in out.values())
    assert torch.equal(out["input_ids"], batch["input_ids"][:, :16].long())


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2,
                                       n_head=2, bos_token_id=0, eos_token_id=0))
    return model.eval()


def right_padded_pairs() -> dict:
    """Two prompt/completion rows, right-padded, labels -100 over prompts and padding."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, 64, (2, 16), generator=generator)
    mask = torch.zeros((2, 16), dtype=torch.long)
    labels = torch.full((2, 16), IGNORE_INDEX)
    for row, (prompt, length) in enumerate(((3, 12), (5, 7))):
        mask[row, :length] = 1
        labels[row, prompt:length] = input_ids[row, prompt:length]
        input_ids[row, length:] = 0  # the pad id
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def test_token_loss_without_a_mask_is_transformers_masked_mean_loss():
    """No attention mask (so SDPA takes its fused causal path): with right padding no real token
    sees a pad under causal attention, so the loss equals transformers' own masked loss."""
    model, batch = tiny_gpt2(), right_padded_pairs()
    with torch.no_grad():
        loss_sum, targets = token_loss_sum(model, batch)
        reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"]).loss
    # Targets: the completion tokens after the first column, 12-3 and 7-5.
    assert int(targets) == 9 + 2
    assert (loss_sum / targets).item() == pytest.approx(reference.item(), rel=1e-5)
