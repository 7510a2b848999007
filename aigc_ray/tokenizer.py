"""Tokenizers: load one as every job uses it, train the built-in model's, describe one for
Ray Data's tokenizer actors, and the context length a model and its tokenizer state.

Below both data (whose actors tokenize) and model (which trains the built-in tokenizer and
loads tokenizers beside models): this module needs neither, nor torch.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Iterable

IGNORE_INDEX = -100  # label value the HF loss ignores: prompt tokens and padding
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

# The built-in tiny model's template: a role token, the text, then EOS closing every turn, so a
# reply ends where generation stops. The role tokens are special tokens of its tokenizer.
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
TINY_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)


def clean(text: str) -> str:
    """Normalize Unicode (NFC) and line endings; strip NULs that confuse tokenizers."""
    return unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\x00", "")


def context_length(model_config, tokenizer=None) -> int | None:
    """Tokens the model attends over: its position table, else the tokenizer's stated limit;
    None when neither states one. Training checks data.block_size against it, serving and batch
    generation size prompts by it."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    # Tokenizers that state no limit report a huge sentinel (int(1e30)), not None.
    return limit if isinstance(limit, int) and 0 < limit < 1_000_000 else None


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """A tokenizer with a pad token (EOS when the model has none) and EOS appended by us."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE tokenizer on `texts` and wrap it as a transformers tokenizer
    that carries the built-in chat template."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2,
                            special_tokens=[EOS_TOKEN, PAD_TOKEN, *ROLE_TOKENS],
                            show_progress=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN, extra_special_tokens=list(ROLE_TOKENS))
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def tokenizer_spec(path: str, trust_remote_code: bool = False) -> dict:
    """What a `TokenizeAndPack` actor needs to tokenize exactly as transformers does without
    importing torch and transformers itself (that import was ~2 s of every actor's start): the
    fast tokenizer's Rust backend serialized as transformers configured it (normalizer,
    pre-tokenizer, added tokens, the post-processor that adds BOS/EOS), and the EOS and pad ids.
    A tokenizer with no fast backend is loaded from `path` by the actor instead."""
    tokenizer = load_tokenizer(path, trust_remote_code)
    spec = {"path": path, "trust_remote_code": trust_remote_code,
            "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id,
            "chat_template": bool(tokenizer.chat_template)}
    if tokenizer.is_fast:
        spec["backend"] = tokenizer.backend_tokenizer.to_str()
        spec["split_special_tokens"] = bool(getattr(tokenizer, "split_special_tokens", False))
    return spec


def encoder(spec: dict) -> Callable[[list[str], bool], list[list[int]]]:
    """(texts, add_special_tokens) → token ids, from a `tokenizer_spec`."""
    if "backend" not in spec:
        tokenizer = load_tokenizer(spec["path"], spec["trust_remote_code"])
        return lambda texts, special: tokenizer(texts, add_special_tokens=special,
                                                verbose=False)["input_ids"]
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(spec["backend"])
    # What transformers' fast tokenizer sets before each unpadded, untruncated call.
    backend.no_padding()
    backend.no_truncation()
    backend.encode_special_tokens = spec["split_special_tokens"]
    return lambda texts, special: [encoding.ids for encoding in
                                   backend.encode_batch(texts, add_special_tokens=special)]
