"""Tokenizing and packing: Ray Data tokenizer actors clean, tokenize and label documents (or
conversations) and pack them into fixed-size blocks of `input_ids`, `labels` and `position_ids`.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np

from aigc_ray.config import Config, Data
from aigc_ray.data.chat import labelled_conversation
from aigc_ray.data.read import MESSAGES_COLUMN, ROW_COLUMN, ray_get
from aigc_ray.errors import DataError
from aigc_ray.tokenizer import IGNORE_INDEX, clean, encoder, load_tokenizer


class TokenizeAndPack:
    """Ray Data callable class: each actor builds the tokenizer once, then packs batches.

    Every mode yields blocks of `block_size` tokens with `input_ids`, `attention_mask` (1 on
    real tokens, which always come first) and `labels` (-100 where no loss is taken):

    - Causal-LM text: documents joined with EOS and cut into blocks; the tail of a batch
      becomes one last padded block rather than being dropped.
    - Prompt/completion: one sequence per pair, labels -100 over the prompt; too-long pairs are
      truncated and counted, pairs whose prompt alone fills the block are skipped and counted.
    - Conversations: one sequence per conversation rendered by the chat template, labelled as
      `data.train_on` says (see `chat.labelled_conversation`).

    With `data.packing`, examples (pairs, conversations, or documents cut to the block) are
    packed several to a block instead, with a `position_ids` column that restarts at every
    example: transformers confines attention to each example from those restarts, and the first
    token of each example is never a target, so no example learns from another.
    """

    def __init__(self, tokenizer: dict, data: dict, split: str, stats=None):
        if not isinstance(tokenizer, dict):  # a ref (see `tokenize`)
            import ray

            tokenizer = ray.get(tokenizer)
        self.data = Data.model_validate(data)
        if self.data.chat:  # chat templates render through transformers' own tokenizer
            self.chat_tokenizer = load_tokenizer(tokenizer["path"], tokenizer["trust_remote_code"])
        else:
            self.encode = encoder(tokenizer)
        self.split, self.stats = split, stats
        self.block_size = self.data.block_size
        self.eos, self.pad = tokenizer["eos"], tokenizer["pad"]

    def _ids(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        return self.encode([clean(t) for t in texts], add_special_tokens)

    def __call__(self, batch: dict) -> dict:
        counts: Counter = Counter()
        data = self.data
        if data.chat:
            examples = self._conversations(list(batch[MESSAGES_COLUMN]), counts)
        elif data.supervised:
            examples = self._pairs(list(batch[data.prompt_field]),
                                   list(batch[data.completion_field]), counts)
        elif data.packing:
            examples = self._documents(list(batch[data.text_field]))
        else:
            examples = None
        out = (self._joined(list(batch[data.text_field]), counts) if examples is None
               else self._rows(examples, counts))
        if self.stats is not None:
            # The batch's first row and length name it: unique in a pass even when documents
            # repeat, and the same when a retried task sends it again.
            rows = batch[ROW_COLUMN]
            key = f"tokenize:{self.split}:{rows[0]}:{len(rows)}"
            ray_get(self.stats.record.remote(key, dict(counts)))
        return out

    def _empty(self) -> dict:
        shape = (0, self.block_size)
        out = {"input_ids": np.zeros(shape, np.int32), "attention_mask": np.zeros(shape, np.int8),
               "labels": np.zeros(shape, np.int32)}
        if self.data.packing:
            out["position_ids"] = np.zeros(shape, np.int32)
        return out

    def _joined(self, texts: list[str], counts: Counter) -> dict:
        stream: list[int] = []
        for ids in self._ids(texts, add_special_tokens=True):
            stream += ids if ids and ids[-1] == self.eos else ids + [self.eos]
        if not stream:
            return self._empty()
        block = self.block_size
        num_blocks = -(-len(stream) // block)
        padding = num_blocks * block - len(stream)
        input_ids = np.array(stream + [self.pad] * padding, np.int32).reshape(num_blocks, block)
        attention_mask = np.ones_like(input_ids, np.int8)
        if padding:
            attention_mask[-1, block - padding:] = 0
        labels = np.where(attention_mask == 1, input_ids, IGNORE_INDEX).astype(np.int32)
        counts.update({f"tokens.{self.split}": len(stream), f"blocks.{self.split}": num_blocks,
                       f"padding.{self.split}": padding})
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def _documents(self, texts: list[str]) -> list[tuple[list[int], list[int]]]:
        """Each document with its EOS, cut into pieces of at most a block: packing examples."""
        examples = []
        for ids in self._ids(texts, add_special_tokens=True):
            ids = ids if ids and ids[-1] == self.eos else ids + [self.eos]
            for start in range(0, len(ids), self.block_size):
                piece = ids[start:start + self.block_size]
                examples.append((piece, list(piece)))
        return examples

    def _pairs(self, prompts: list[str], completions: list[str],
               counts: Counter) -> list[tuple[list[int], list[int]]]:
        block = self.block_size
        examples = []
        prompt_ids = self._ids(prompts, add_special_tokens=True)
        completion_ids = self._ids(completions, add_special_tokens=False)
        for prompt, completion in zip(prompt_ids, completion_ids):
            if not completion or completion[-1] != self.eos:
                completion = completion + [self.eos]
            if len(prompt) >= block:
                counts["skipped.prompt_too_long"] += 1
                continue
            if len(prompt) + len(completion) > block:
                counts[f"truncated.{self.split}"] += 1
                completion = completion[: block - len(prompt)]
            examples.append((prompt + completion, [IGNORE_INDEX] * len(prompt) + completion))
        return examples

    def _conversations(self, rows: list[str],
                       counts: Counter) -> list[tuple[list[int], list[int]]]:
        examples = []
        for row in rows:
            example = labelled_conversation(self.chat_tokenizer, json.loads(row),
                                            self.data.train_on, self.block_size)
            if isinstance(example, str):
                counts[f"skipped.{example}"] += 1
                continue
            ids, labels, cut = example
            counts[f"truncated.{self.split}"] += int(cut)
            examples.append((ids, labels))
        return examples

    def _rows(self, examples: list[tuple[list[int], list[int]]], counts: Counter) -> dict:
        """Examples laid into blocks: one each, or packed (see the class docstring). Counts the
        padding both ways, so the `data` summary can say what packing saves."""
        block = self.block_size
        lengths = [len(ids) for ids, _ in examples]
        packed_rows = pack_lengths(lengths, block)
        rows = packed_rows if self.data.packing else [[i] for i in range(len(examples))]
        if not rows:
            return self._empty()
        input_ids = np.full((len(rows), block), self.pad, np.int32)
        labels = np.full((len(rows), block), IGNORE_INDEX, np.int32)
        attention_mask = np.zeros((len(rows), block), np.int8)
        position_ids = np.zeros((len(rows), block), np.int32) if self.data.packing else None
        for r, members in enumerate(rows):
            at = 0
            for i in members:
                ids, lab = examples[i]
                end = at + len(ids)
                input_ids[r, at:end], labels[r, at:end] = ids, lab
                labels[r, at] = IGNORE_INDEX  # never predicted from the example before it
                if position_ids is not None:
                    position_ids[r, at:end] = np.arange(len(ids))
                at = end
            attention_mask[r, :at] = 1
            if position_ids is not None:
                position_ids[r, at:] = np.arange(block - at)  # padding: a segment of its own
        real = sum(lengths)
        counts.update({f"tokens.{self.split}": real, f"blocks.{self.split}": len(rows),
                       f"padding.{self.split}": len(rows) * block - real,
                       f"padding_unpacked.{self.split}": len(examples) * block - real,
                       f"padding_packed.{self.split}": len(packed_rows) * block - real,
                       f"target_tokens.{self.split}": int((labels != IGNORE_INDEX).sum())})
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if position_ids is not None:
            out["position_ids"] = position_ids
        return out


def pack_lengths(lengths: list[int], block_size: int) -> list[list[int]]:
    """Indices of examples grouped into blocks of at most `block_size` tokens: first fit,
    longest first (close to the fewest blocks, and the same grouping every time)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(block_size - lengths[i])
    return rows


def tokenize(documents, cfg: Config, tokenizer: dict, split: str, stats=None):
    """Documents (from `read_corpus`) → packed blocks, by a pool of tokenizer actors;
    `tokenizer` is a `tokenizer_spec`."""
    import ray

    if cfg.data.chat and not tokenizer["chat_template"]:
        raise DataError(f"data.chat_format {cfg.data.chat_format} needs a chat template, and the "
                        f"tokenizer of {tokenizer['path']} has none: use a chat (instruct) model "
                        "or builtin:tiny, or add a chat_template to its tokenizer_config.json")
    # When this pool starts, Ray core logs "Actor with class name: 'MapWorker(...)' ... has
    # constructor arguments in the object store and max_restarts > 0". Our arguments are not the
    # cause (they are small; the tokenizer travels as a ref nested in them): Ray Data creates
    # every pool actor with two ObjectRefs of its own as arguments (its DataContext and this
    # UDF, each put once per operator) and with max_restarts=-1, and core warns whenever both
    # hold, for any actor UDF (ray-project/ray#57733). Only max_restarts=0 silences it, and then
    # a tokenizer actor that dies (its node lost, an OOM kill) fails the whole run with
    # ActorDiedError instead of being restarted (test_a_killed_tokenizer_actor_is_restarted_...
    # kills one mid-pass: it passes as is and fails with max_restarts=0). The risk it warns of
    # (#53727: a restart that finds its arguments gone) does not arise here: the running
    # operator holds both refs, and the process that put them owns them, so they last as long
    # as the pipeline that could restart the actor.
    return documents.map_batches(
        TokenizeAndPack,
        # A real tokenizer's vocabulary is megabytes: a ref keeps it out of the UDF that Ray Data
        # serializes, as its large-UDF warning advises.
        fn_constructor_kwargs={"tokenizer": ray.put(tokenizer), "data": cfg.data.model_dump(),
                               "split": split, "stats": stats},
        batch_size=cfg.data.tokenize_batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.data.tokenizer_actors),
        num_cpus=cfg.data.cpus_per_task,
        batch_format="numpy",
    )
