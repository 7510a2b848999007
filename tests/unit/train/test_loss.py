"""The next-token loss shared by training and evaluation: how much padding a batch keeps, that
the loss without an attention mask is the loss a user would compute with one, and
train.loss_impl=chunked against the plain loss: the same loss and gradients on a Qwen2-shaped
model with Qwen's 151,936-token vocabulary, with tied weights and LoRA, and a model whose logits
are more than its output layer refused."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from aigc_ray.errors import UserError
from aigc_ray.tokenizer import IGNORE_INDEX
from aigc_ray.train import loss as loss_module
from aigc_ray.train.loss import (
    PAD_MULTIPLE,
    check_chunked_loss,
    loss_impl_for,
    slice_tokens,
    token_loss_sum,
    trim_padding,
    trimmed_length,
    use_chunked_loss,
)


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


# ── train.loss_impl: chunked ──────────────────────────────────────────────────────────────

QWEN_VOCABULARY = 151_936


def qwen2(vocabulary: int = QWEN_VOCABULARY, **extra):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=vocabulary, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **extra))


def batch(vocabulary: int, rows: int = 3, length: int = 40) -> dict:
    ids = torch.randint(vocabulary, (rows, length), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :10] = IGNORE_INDEX  # a prompt: no targets
    labels[-1, 30:] = IGNORE_INDEX  # padding
    return {"input_ids": ids, "labels": labels}


def loss_and_grads(model, data: dict, chunked: bool):
    model.zero_grad(set_to_none=True)
    loss, tokens = token_loss_sum(model, data, chunked)
    loss.backward()
    return loss.detach(), tokens, {name: p.grad.clone() for name, p in model.named_parameters()
                                   if p.grad is not None}


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_loss_and_gradients_equal_the_plain_ones(tied, monkeypatch):
    monkeypatch.setattr(loss_module, "SLICE_BYTES", 1)  # the smallest slices: 16 tokens
    plain_model = qwen2(tie_word_embeddings=tied)
    chunked_model = copy.deepcopy(plain_model)
    use_chunked_loss(chunked_model)
    data = batch(QWEN_VOCABULARY)
    assert slice_tokens(QWEN_VOCABULARY) == 16  # 80 targets: 5 slices
    loss, tokens, grads = loss_and_grads(plain_model, data, chunked=False)
    chunked_loss, chunked_tokens, chunked_grads = loss_and_grads(chunked_model, data, True)
    assert int(tokens) == int(chunked_tokens) == 30 + 30 + 20
    assert torch.allclose(chunked_loss, loss, rtol=1e-5)
    assert grads.keys() == chunked_grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(chunked_grads[name], grad, rtol=1e-4, atol=1e-6), name
    # Without labels it is the model's own forward (samples, generation): full logits.
    with torch.no_grad():
        logits = chunked_model(input_ids=data["input_ids"][:1]).logits
    assert logits.shape == (1, 40, QWEN_VOCABULARY)


def test_chunked_loss_under_lora_trains_the_same_adapters():
    from peft import LoraConfig, get_peft_model

    def adapted():
        torch.manual_seed(0)
        return get_peft_model(qwen2(4096), LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM",
                                                       target_modules=["q_proj", "v_proj"]))

    plain_model, chunked_model = adapted(), adapted()
    use_chunked_loss(chunked_model)
    data = batch(4096)
    loss, _, grads = loss_and_grads(plain_model, data, chunked=False)
    chunked_loss, _, chunked_grads = loss_and_grads(chunked_model, data, chunked=True)
    assert torch.allclose(chunked_loss, loss, rtol=1e-5)
    assert grads and all("lora_" in name for name in grads)
    for name, grad in grads.items():
        assert torch.allclose(chunked_grads[name], grad, rtol=1e-4, atol=1e-6), name


def test_no_targets_is_a_zero_loss_and_evaluation_computes_no_gradients():
    model = qwen2(4096)
    use_chunked_loss(model)
    data = batch(4096)
    data["labels"][:] = IGNORE_INDEX  # fsdp's filler batch
    loss, tokens = token_loss_sum(model, data, chunked=True)
    assert float(loss.detach()) == 0.0 and int(tokens) == 0
    with torch.no_grad():
        loss, _ = token_loss_sum(model, batch(4096), chunked=True)
    assert loss.requires_grad is False and float(loss) > 0


def test_a_model_whose_logits_are_more_than_its_output_layer_is_refused_in_one_line():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(Gemma2Config(
        vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        final_logit_softcapping=0.01))  # small: random logits are small
    use_chunked_loss(gemma)
    with pytest.raises(UserError, match="set train.loss_impl=plain") as error:
        check_chunked_loss(gemma, "cpu")
    assert "\n" not in str(error.value)
    plain = qwen2(4096)
    use_chunked_loss(plain)
    check_chunked_loss(plain, "cpu")  # passes


def test_auto_chunks_large_vocabularies_only():
    assert loss_impl_for("auto", QWEN_VOCABULARY) == "chunked"
    assert loss_impl_for("auto", 50_257) == "plain"
    assert loss_impl_for("plain", QWEN_VOCABULARY) == "plain"
    assert loss_impl_for("chunked", 512) == "chunked"


def test_evaluation_scores_large_vocabularies_chunked_and_the_same():
    from aigc_ray.evaluate import chunk_loss_if_large

    model = qwen2().eval()
    data = batch(QWEN_VOCABULARY)
    with torch.inference_mode():
        plain, _ = token_loss_sum(model, data)
    assert chunk_loss_if_large(model, "cpu")
    with torch.inference_mode():
        chunked, _ = token_loss_sum(model, data, chunked=True)
    assert torch.allclose(chunked, plain, rtol=1e-5)
    assert not chunk_loss_if_large(qwen2(4096), "cpu")  # a small vocabulary: plain
