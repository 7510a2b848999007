"""Conversations and packing: each chat format read from files made here, the token/label
layout the chat template gives, cuts at turn boundaries, and packed examples that neither see
nor teach each other."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from aigc_ray.config import Data
from aigc_ray.data.chat import chat_ids, conversation, detect_format, labelled_conversation
from aigc_ray.data.pack import TokenizeAndPack, pack_lengths
from aigc_ray.data.read import MESSAGES_COLUMN, ROW_COLUMN, read_documents, validate_record
from aigc_ray.errors import DataError
from aigc_ray.tokenizer import IGNORE_INDEX, build_tokenizer, tokenizer_spec
from aigc_ray.train.loss import token_loss_sum

TEXTS = ["Customer: How do I reset my password? Agent: Open the app and choose Sign in.",
         "Customer: Where is my order? Agent: The tracking number is under Orders."] * 40
TALK = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How do I reset my password?"},
        {"role": "assistant", "content": "Open the app."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You are welcome."}]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(TEXTS, 400).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from aigc_ray.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


def chat_data(**overrides) -> Data:
    return Data(**{"chat_format": "auto", "prompt_field": None, "completion_field": None,
                   "block_size": 128, **overrides})


# ── reading the formats ─────────────────────────────────────────────────────────────────────


def test_each_format_reads_as_the_same_messages():
    openai = {"messages": [{"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]}]}
    sharegpt = {"conversations": [{"from": "human", "value": "Hi"},
                                  {"from": "gpt", "value": "Hello"}]}
    alpaca = {"instruction": "Hi", "input": "", "output": "Hello"}
    expected = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    for record, chat_format in ((openai, "openai"), (sharegpt, "sharegpt"), (alpaca, "alpaca")):
        assert detect_format(record, {}) == chat_format
        assert conversation(record, chat_format, {}) == expected
    with_input = {"instruction": "Translate", "input": "bonjour", "output": "hello",
                  "system": "Be exact."}
    assert conversation(with_input, "alpaca", {}) == [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "Translate\n\nbonjour"},
        {"role": "assistant", "content": "hello"}]


def test_renamed_fields_and_trailing_turns():
    renames = {"messages": "dialog", "role": "speaker", "content": "text"}
    record = {"dialog": [{"speaker": "user", "text": "Hi"}, {"speaker": "assistant", "text": "Yo"},
                         {"speaker": "user", "text": "Bye"}]}
    assert detect_format(record, renames) == "openai"
    # The user turn after the last reply teaches nothing: dropped, not a skip.
    assert conversation(record, "openai", renames) == [{"role": "user", "content": "Hi"},
                                                       {"role": "assistant", "content": "Yo"}]
    assert detect_format({"text": "plain"}, {}) is None


@pytest.mark.parametrize("record, reason", [
    ({"messages": [{"role": "wizard", "content": "Hi"}]}, "unknown_role"),
    ({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}]},
     "empty_text"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, "no_assistant_turn"),
    ({"messages": "Hi"}, "wrong_type"),
    ({"messages": [{"role": "user", "content": 3}]}, "wrong_type"),
    ({"messages": [["user", "Hi"]]}, "wrong_type"),
    ({"messages": [{"role": "user"}]}, "missing_field"),
    ({"conversations": [{"from": "human", "value": "Hi"}]}, "no_assistant_turn"),
    ({"instruction": "Hi"}, "missing_field"),
    ({"instruction": "Hi", "output": 4}, "wrong_type"),
    ({"prompt": "Hi", "completion": "Yo"}, "unknown_format"),
])
def test_bad_conversations_are_skipped_with_a_reason(record, reason):
    assert validate_record(record, chat_data()) == reason


def test_a_file_of_mixed_rows_is_counted_per_format_and_reason(tmp_path):
    rows = [{"messages": TALK}, {"conversations": [{"from": "human", "value": "Hi"},
                                                   {"from": "gpt", "value": "Hello"}]},
            {"instruction": "Hi", "output": "Hello"}, {"messages": [{"role": "bot", "content": "x"}]}]
    data = chat_data(val_fraction=0.0)
    raw = io.BytesIO("\n".join(json.dumps(r) for r in rows).encode())
    tables = list(read_documents(raw, "chats.jsonl", data, None, None))
    assert sum(t.num_rows for t in tables) == 3
    messages = [json.loads(m) for t in tables for m in t.column(MESSAGES_COLUMN).to_pylist()]
    assert messages[0] == TALK
    strict = chat_data(strict=True)
    with pytest.raises(DataError, match=r"chats.jsonl line 4: unknown role"):
        list(read_documents(io.BytesIO(raw.getvalue()), "chats.jsonl", strict, None, None))


# ── the token/label layout ──────────────────────────────────────────────────────────────────


def spans(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) runs of labelled positions."""
    runs, start = [], None
    for i, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_assistant_replies_are_labelled_and_nothing_else(tokenizer):
    ids, labels, cut = labelled_conversation(tokenizer, TALK, "assistant", 512)
    assert not cut and ids == chat_ids(tokenizer, TALK, add_generation_prompt=False)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    # The template writes a role token and a newline before each turn and EOS after it.
    assert [t for t in tokens if t.startswith("<|")] == [
        "<|system|>", "<|endoftext|>", "<|user|>", "<|endoftext|>", "<|assistant|>",
        "<|endoftext|>", "<|user|>", "<|endoftext|>", "<|assistant|>", "<|endoftext|>"]
    runs = spans(labels)
    assert len(runs) == 2
    for (start, end), reply in zip(runs, ("Open the app.", "You are welcome.")):
        assert tokens[start - 2] == "<|assistant|>"  # the header is the prompt's, not learnt
        assert tokenizer.decode(ids[start:end - 1]) == reply
        assert tokens[end - 1] == "<|endoftext|>"  # the reply's end is learnt: it stops there
        assert labels[start:end] == ids[start:end]
    # The prompt the server sends for the first reply is exactly what precedes it in training.
    prompt = chat_ids(tokenizer, TALK[:2], add_generation_prompt=True)
    assert ids[:runs[0][0]] == prompt


def test_train_on_last_assistant_and_all(tokenizer):
    ids, labels, _ = labelled_conversation(tokenizer, TALK, "last_assistant", 512)
    assert spans(labels) == spans(labelled_conversation(tokenizer, TALK, "assistant", 512)[1])[1:]
    ids, labels, _ = labelled_conversation(tokenizer, TALK, "all", 512)
    assert labels == ids


def test_a_long_conversation_is_cut_after_a_whole_reply(tokenizer):
    ids, labels, _ = labelled_conversation(tokenizer, TALK, "assistant", 512)
    first_end = spans(labels)[0][1]
    cut_ids, cut_labels, cut = labelled_conversation(tokenizer, TALK, "assistant", len(ids) - 1)
    assert cut and cut_ids == ids[:first_end] and cut_labels == labels[:first_end]
    assert labelled_conversation(tokenizer, TALK, "assistant", first_end - 1) == \
        "conversation_too_long"


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    import copy

    odd = copy.copy(tokenizer)
    # Numbers each turn from the end: a conversation's start renders differently once it grows.
    odd.chat_template = ("{%- for m in messages -%}{{ (messages|length - loop.index)|string + "
                         "m['content'] + eos_token }}{%- endfor -%}")
    assert labelled_conversation(odd, TALK, "assistant", 512) == "template_mismatch"


# ── the tokenizer actor: chat rows and packing ──────────────────────────────────────────────


def pack_batch(tokenizer_dir: str, data: Data, documents: list) -> dict:
    actor = TokenizeAndPack(tokenizer_spec(tokenizer_dir), data.model_dump(), "train")
    column = MESSAGES_COLUMN if data.chat else data.text_field
    values = [json.dumps(d) if data.chat else d for d in documents]
    return actor({column: np.array(values, dtype=object),
                  ROW_COLUMN: np.array([str(i) for i in range(len(values))])})


CHATS = [TALK, TALK[1:3], [{"role": "user", "content": "Where is my order?"},
                           {"role": "assistant", "content": "Under Orders."}]]


def test_packing_fills_blocks_and_restarts_positions(tokenizer_dir):
    unpacked = pack_batch(tokenizer_dir, chat_data(), CHATS)
    packed = pack_batch(tokenizer_dir, chat_data(packing=True), CHATS)
    assert unpacked["input_ids"].shape[0] == 3 and "position_ids" not in unpacked
    assert packed["input_ids"].shape[0] == 1
    assert packed["attention_mask"].sum() == unpacked["attention_mask"].sum()
    positions = packed["position_ids"][0]
    starts = [i for i in range(1, 128) if positions[i] == 0]
    assert len(starts) == 3  # two more examples, then the padding's own segment
    # No example's first token is a target: it would be predicted from the one before it.
    for start in [0, *starts[:2]]:
        assert packed["labels"][0, start] == IGNORE_INDEX
    assert (packed["labels"] != IGNORE_INDEX).sum() == (unpacked["labels"] != IGNORE_INDEX).sum()


def test_plain_text_packs_documents_or_joins_them(tokenizer_dir):
    data = Data(format="text", block_size=16, prompt_field=None, completion_field=None)
    docs = ["Where is my order?", "Open the app and choose Sign in. " * 3, "Thanks"]
    joined = pack_batch(tokenizer_dir, data, docs)
    assert "position_ids" not in joined  # packing off: the EOS-joined stream, as before
    packed = pack_batch(tokenizer_dir, data.model_copy(update={"packing": True}), docs)
    assert packed["attention_mask"].sum() == joined["attention_mask"].sum()
    assert (packed["position_ids"] < 16).all()


def test_pack_lengths_first_fit_longest_first():
    assert pack_lengths([5, 9, 3, 7, 1], 10) == [[1, 4], [3, 2], [0]]
    assert pack_lengths([], 10) == []


def tiny_model(tokenizer, attention: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2,
                        n_head=2, attn_implementation=attention)
    return GPT2LMHeadModel(config).eval()


def example_losses(model, batch: dict, per_row_examples: bool) -> list[float]:
    """Summed next-token loss of each example in a batch of blocks."""
    import torch.nn.functional as F

    tensors = {k: torch.from_numpy(v).long() for k, v in batch.items()}
    inputs = {"input_ids": tensors["input_ids"], "use_cache": False}
    if "position_ids" in tensors:
        inputs["position_ids"] = tensors["position_ids"]
    with torch.no_grad():
        logits = model(**inputs).logits.float()
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), tensors["labels"][:, 1:],
                             ignore_index=IGNORE_INDEX, reduction="none")
    out = []
    for row in range(losses.shape[0]):
        real = int(tensors["attention_mask"][row].sum())
        positions = tensors.get("position_ids", torch.arange(128).expand_as(tensors["input_ids"]))
        starts = [i for i in range(real) if positions[row, i] == 0] + [real]
        for a, b in zip(starts, starts[1:]) if not per_row_examples else [(0, real)]:
            out.append(float(losses[row, a:b - 1].sum()))  # the step into b is the next example's
    return out


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_examples_lose_exactly_what_they_lose_alone(tokenizer, tokenizer_dir, attention):
    model = tiny_model(tokenizer, attention)
    unpacked = example_losses(model, pack_batch(tokenizer_dir, chat_data(), CHATS), True)
    packed_batch = pack_batch(tokenizer_dir, chat_data(packing=True), CHATS)
    packed = example_losses(model, packed_batch, False)
    assert sorted(packed) == pytest.approx(sorted(unpacked), abs=1e-5)
    # The same through the training loss: one sum over the packed block.
    tensors = {k: torch.from_numpy(v).long() for k, v in packed_batch.items()}
    with torch.no_grad():
        total, _ = token_loss_sum(model, tensors)
    assert float(total) == pytest.approx(sum(unpacked), abs=1e-4)


def test_an_example_s_logits_do_not_change_beside_another(tokenizer, tokenizer_dir):
    model = tiny_model(tokenizer, "sdpa")
    alone = pack_batch(tokenizer_dir, chat_data(packing=True), CHATS[2:])
    together = pack_batch(tokenizer_dir, chat_data(packing=True), CHATS)
    length = int(alone["attention_mask"].sum())
    ids = alone["input_ids"][0, :length]
    row = together["input_ids"][0]
    start = next(i for i in range(len(row) - length + 1)
                 if (row[i:i + length] == ids).all() and together["position_ids"][0, i] == 0)
    assert start > 0  # another example sits before it
    with torch.no_grad():
        logits_alone = model(input_ids=torch.from_numpy(ids).long()[None]).logits
        logits_together = model(
            input_ids=torch.from_numpy(row).long()[None], use_cache=False,
            position_ids=torch.from_numpy(together["position_ids"][0]).long()[None]).logits
    assert torch.allclose(logits_together[0, start:start + length], logits_alone[0], atol=1e-5)


def test_the_packing_probe_passes_gpt2_and_refuses_a_leaky_model(tokenizer):
    from aigc_ray.errors import UserError
    from aigc_ray.train.loss import check_packed_attention

    model = tiny_model(tokenizer, "sdpa").train()
    check_packed_attention(model, torch.device("cpu"))
    assert model.training  # the probe runs in eval mode and gives the mode back

    class Leaky(torch.nn.Module):  # a model that ignores position_ids, as some remote code does
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_input_embeddings(self):
            return self.inner.get_input_embeddings()

        def forward(self, input_ids, position_ids=None, use_cache=None):
            return self.inner(input_ids=input_ids, use_cache=use_cache)

    with pytest.raises(UserError, match="data.packing=false"):
        check_packed_attention(Leaky(model), torch.device("cpu"))


def test_a_block_longer_than_the_model_s_positions_fails_before_training(tokenizer, tmp_path):
    from aigc_ray.config import load_config
    from aigc_ray.errors import ConfigError
    from aigc_ray.train.driver import check_model_settings

    tiny_model(tokenizer, "sdpa").save_pretrained(tmp_path)  # 128 positions
    check_model_settings(load_config("tiny_chat", ["data.block_size=128"]), str(tmp_path))
    with pytest.raises(ConfigError, match="set data.block_size to at most 128"):
        check_model_settings(load_config("tiny_chat", ["data.block_size=256"]), str(tmp_path))
