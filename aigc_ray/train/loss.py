"""The next-token loss, one definition for the training loop and for perplexity evaluation."""

from __future__ import annotations

from aigc_ray.tokenizer import IGNORE_INDEX

PAD_MULTIPLE = 8  # trimmed lengths round up to this: tensor-core friendly, fewer distinct shapes


def token_loss_sum(model, batch: dict, chunked: bool = False):
    """(sum of next-token cross-entropy over target tokens, number of target tokens).
    `chunked`: the model computes it from its hidden states without full logits
    (`chunked_loss.use_chunked_loss`).

    The model gets no attention mask: our blocks are padded only on the right, so under causal
    attention no real token ever sees padding, and padding positions carry IGNORE_INDEX labels.
    Without a mask, SDPA takes its fused causal (flash) kernel instead of a masked one.

    Packed blocks carry `position_ids` that restart at each example; from those restarts
    transformers confines attention to each example (a block-diagonal causal mask, or varlen
    flash attention where the model runs on it), but only when the forward builds no KV cache,
    hence use_cache=False (a cache is also wasted memory in training).
    """
    import torch.nn.functional as F

    inputs = {"input_ids": batch["input_ids"], "use_cache": False}
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"]
    targets = batch["labels"][:, 1:]
    if chunked:
        return model(**inputs, labels=batch["labels"]).loss, (targets != IGNORE_INDEX).sum()
    logits = model(**inputs).logits
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


def check_packed_attention(model, device) -> None:
    """Packing is right only when the model confines attention to each packed example (models
    whose masks transformers builds from `position_ids`). Probe it once before training: the
    same eight tokens must give the same logits alone and after another example."""
    import torch

    from aigc_ray.errors import UserError

    vocab = model.get_input_embeddings().num_embeddings
    tokens = torch.randint(vocab, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)
    positions = torch.cat([torch.arange(8), torch.arange(8)])[None].to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = model(input_ids=tokens[:, 8:], use_cache=False).logits.float()
            packed = model(input_ids=tokens, position_ids=positions, use_cache=False).logits
    finally:
        model.train(was_training)
    if not torch.allclose(packed[:, 8:].float(), alone, atol=1e-3, rtol=1e-3):
        raise UserError(f"data.packing: {type(model).__name__} lets packed examples attend to "
                        "each other (its attention ignores restarting position_ids); set "
                        "data.packing=false")
