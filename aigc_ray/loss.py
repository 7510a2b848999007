"""The next-token loss, one definition for the training loop and for perplexity evaluation."""

from __future__ import annotations

from aigc_ray.data import IGNORE_INDEX

PAD_MULTIPLE = 8  # trimmed lengths round up to this: tensor-core friendly, fewer distinct shapes


def token_loss_sum(model, batch: dict):
    """(sum of next-token cross-entropy over target tokens, number of target tokens).

    The model gets no attention mask: our blocks are padded only on the right, so under causal
    attention no real token ever sees padding, and padding positions carry IGNORE_INDEX labels.
    Without a mask, SDPA takes its fused causal (flash) kernel instead of a masked one.
    """
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"]).logits
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                           targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (targets != IGNORE_INDEX).sum()


def trimmed_length(lengths, block_size: int) -> int:
    """Columns to keep: the longest real sequence, rounded up to PAD_MULTIPLE (at least 2)."""
    longest = max(int(lengths.max()) if len(lengths) else 0, 2)
    return min(block_size, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)


def trim_padding(batch: dict) -> dict:
    """Cut the columns past the longest real sequence: padding costs compute, not accuracy."""
    mask = batch["attention_mask"]
    length = trimmed_length(mask.sum(dim=1), mask.shape[1])
    return {key: value[:, :length].long() for key, value in batch.items()}
