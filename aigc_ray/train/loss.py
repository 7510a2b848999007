"""The next-token loss, one definition for the training loop and for perplexity evaluation.

`train.loss_impl: chunked` (below `token_loss_sum`'s helpers): the same loss without the full
logits tensor. A causal LM's forward computes logits for every position: batch × length ×
vocabulary, in fp32 for the loss. At 8 × 2,048 tokens and Qwen's 151,936-token vocabulary that
is ~10 GB, the largest tensor of the step (its gradient as large again). With the chunked loss
the model returns its last hidden states instead, and `LinearCrossEntropy` takes the output
layer and the cross-entropy together, a slice of target tokens at a time: each slice's logits
exist only while its loss and its gradients (towards the hidden states and the output weight)
are computed, in the forward pass, so the backward pass recomputes nothing. Positions without a
target (prompt tokens, padding) never reach the output layer at all. The loss and gradients are
those of the plain computation (tested to 1e-5), under DDP, FSDP2 and LoRA; `check_chunked_loss`
compares the two once at start, so a model whose logits are more than its output layer (a
softcap, a scale) is refused in one line rather than trained wrong.
"""

from __future__ import annotations

import types

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


# ── train.loss_impl: chunked ──────────────────────────────────────────────────────────────────

# `train.loss_impl: auto` chunks the loss from this output vocabulary up: Llama 3's 128,256,
# Qwen's 151,936 and Gemma's 256,000 do; GPT-2's 50,257 and the tiny model do not.
LARGE_VOCABULARY = 65_536
# What one slice's fp32 logits may take: ~440 tokens at Qwen's vocabulary. Past a few hundred
# tokens a slice's matrix products are as efficient as the whole batch's.
SLICE_BYTES = 256 * 2**20


def loss_impl_for(setting: str, vocabulary: int) -> str:
    """`train.loss_impl` resolved: auto → chunked for large vocabularies, else plain."""
    if setting != "auto":
        return setting
    return "chunked" if vocabulary >= LARGE_VOCABULARY else "plain"


def slice_tokens(vocabulary: int) -> int:
    return max(16, SLICE_BYTES // (4 * vocabulary))


class LinearCrossEntropy:
    """Summed cross-entropy of `hidden @ weight.T + bias` against `targets`, slice by slice,
    its gradients computed in the same pass (an autograd Function; `apply` it)."""

    @staticmethod
    def function():
        import torch

        class Function(torch.autograd.Function):
            @staticmethod
            def forward(ctx, hidden, weight, bias, targets):
                grads = any(ctx.needs_input_grad[:3])  # not under no_grad (evaluation)
                step = slice_tokens(weight.shape[0])
                total = torch.zeros((), dtype=torch.float32, device=hidden.device)
                grad_hidden = torch.empty_like(hidden) if grads else None
                grad_weight = torch.zeros_like(weight, dtype=torch.float32) if grads else None
                grad_bias = (torch.zeros_like(bias, dtype=torch.float32)
                             if grads and bias is not None else None)
                for start in range(0, hidden.shape[0], step):
                    h, t = hidden[start:start + step], targets[start:start + step]
                    logits = torch.nn.functional.linear(h, weight, bias).float()
                    log_probs = torch.log_softmax(logits, dim=-1)  # one fused pass
                    del logits
                    total -= log_probs.gather(1, t[:, None]).sum()
                    if not grads:
                        continue
                    # d(sum of losses)/d(logits) = softmax - one-hot of the target.
                    d_logits = log_probs.exp_()
                    d_logits[torch.arange(len(t), device=t.device), t] -= 1
                    d_logits = d_logits.to(h.dtype)
                    grad_hidden[start:start + step] = d_logits @ weight.to(h.dtype)
                    grad_weight += (d_logits.T @ h).float()
                    if grad_bias is not None:
                        grad_bias += d_logits.float().sum(0)
                ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
                ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
                return total

            @staticmethod
            def backward(ctx, grad_total):
                grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
                weight_dtype, bias_dtype = ctx.dtypes
                return (grad_hidden * grad_total.to(grad_hidden.dtype),
                        (grad_weight * grad_total).to(weight_dtype),
                        None if grad_bias is None else (grad_bias * grad_total).to(bias_dtype),
                        None)

        return Function


def use_chunked_loss(model) -> None:
    """Make `model` (a causal LM, or a peft model around one) compute its loss this way whenever
    it is given `labels`: its forward then returns the summed loss as `loss` and no logits.
    Without labels (generation, the samples at each evaluation) it is the model's own forward."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    own_forward = type(base).forward
    function = LinearCrossEntropy.function()

    def forward(self, input_ids=None, labels=None, **kwargs):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        if labels is None:
            return own_forward(self, input_ids=input_ids, **kwargs)
        backbone = getattr(self, self.base_model_prefix)
        hidden = backbone(input_ids=input_ids, **kwargs).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        head = self.get_output_embeddings()
        loss = function.apply(hidden[:, :-1][keep], head.weight, head.bias, targets[keep])
        return CausalLMOutputWithPast(loss=loss)

    base.forward = types.MethodType(forward, base)


def check_chunked_loss(model, device) -> None:
    """The chunked loss must equal the plain one: checked once on a short random batch before
    training. A model whose logits are more than its output layer applied to the last hidden
    states (a softcap, a logit scale) fails here with one line."""
    import torch

    from aigc_ray.errors import UserError

    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(vocab, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    batch = {"input_ids": ids, "labels": ids}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            plain, _ = token_loss_sum(model, batch)
            chunked, _ = token_loss_sum(model, batch, chunked=True)
    finally:
        model.train(was_training)
    if not torch.allclose(plain.float(), chunked.float(), rtol=1e-3, atol=1e-3):
        raise UserError(f"train.loss_impl=chunked: {type(model).__name__}'s logits are not its "
                        f"output layer applied to its last hidden states (loss {float(plain):.4f}"
                        f" plain, {float(chunked):.4f} chunked); set train.loss_impl=plain")
