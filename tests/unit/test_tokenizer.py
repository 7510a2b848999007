"""Tokenizer actors encode with the fast tokenizer's Rust backend alone (no torch/transformers
import in the actor); the ids must be exactly what transformers gives for the same folder,
special tokens, added tokens and BOS/EOS templates included. No Ray needed."""

import json

import pytest
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

from aigc_ray.tokenizer import context_length, encoder, tokenizer_spec

TEXTS = ["hello world", "<|user|> reset<sep>my password </s>", "<s> twice <s>",
         "ünïcode 😀 text\nnew line", "   leading spaces", ""]


def _bpe() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["hello world how are you", "customer: reset my password",
                                   "agent: click reset"] * 50, trainer)
    return tokenizer


def _template_tokenizer(folder) -> str:
    """BOS/EOS added by the tokenizer's own post-processor, plus added and special tokens."""
    backend = _bpe()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>")
    fast.add_tokens(["<sep>"])
    fast.add_special_tokens({"additional_special_tokens": ["<|user|>"]})
    fast.save_pretrained(folder)
    return str(folder)


def _llama_tokenizer(folder) -> str:
    """BOS/EOS added because tokenizer_config.json says add_bos_token/add_eos_token: the
    post-processor is written by transformers when it loads the folder."""
    model = json.loads(_bpe().to_str())["model"]
    llama = transformers.LlamaTokenizer(vocab=model["vocab"],
                                        merges=[tuple(m) for m in model["merges"]],
                                        add_bos_token=True, add_eos_token=True)
    llama.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("make", [_template_tokenizer, _llama_tokenizer])
@pytest.mark.parametrize("special", [True, False])
def test_backend_ids_equal_transformers_ids(tmp_path, make, special):
    folder = make(tmp_path)
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    spec = tokenizer_spec(folder)
    assert "backend" in spec
    assert (spec["eos"], spec["pad"]) == (reference.eos_token_id,
                                          reference.pad_token_id or reference.eos_token_id)
    expected = reference(TEXTS, add_special_tokens=special)["input_ids"]
    assert encoder(spec)(TEXTS, special) == expected
    if special:  # the templates really add tokens, so the test can tell the cases apart
        assert expected[0][0] == reference.bos_token_id
        assert expected[0][-1] == reference.eos_token_id


def test_a_spec_without_a_backend_loads_the_tokenizer_by_path(tmp_path):
    folder = _template_tokenizer(tmp_path)
    spec = {key: value for key, value in tokenizer_spec(folder).items() if key != "backend"}
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    assert encoder(spec)(TEXTS, True) == reference(TEXTS)["input_ids"]


def test_context_length_needs_no_tokenizer():
    """Training checks data.block_size with the model's config alone."""
    from types import SimpleNamespace

    assert context_length(SimpleNamespace(max_position_embeddings=2048)) == 2048
    assert context_length(SimpleNamespace(n_positions=1024),
                          SimpleNamespace(model_max_length=512)) == 1024  # the model's first
    assert context_length(SimpleNamespace()) is None
