"""The Ray Data pipeline on a real local Ray: what a user would check by hand before training.

Every expected number is computed here, independently, with the same tokenizer the pipeline
loads (the built-in tiny model's), on small corpora each test writes for itself.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from aigc_ray.cli import main
from aigc_ray.config import validate
from aigc_ray.data.files import resolve_files
from aigc_ray.data.pack import pack_lengths
from aigc_ray.data.pipeline import build_datasets, corpus_statistics, format_statistics
from aigc_ray.data.read import create_stats, hf_blocks, read_corpus, split_of
from aigc_ray.data.sample import make_pairs
from aigc_ray.errors import DataError
from aigc_ray.tokenizer import IGNORE_INDEX, load_tokenizer

pytestmark = pytest.mark.usefixtures("ray_cluster")


# ── Helpers ─────────────────────────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def make_config(tiny_model_dir, path, **data):
    """A causal-LM text config over `path` (override any `data.*` key by keyword)."""
    fields = {"path": path, "format": "jsonl", "block_size": 32, "val_fraction": 0.0, **data}
    return validate({"model": {"name_or_path": tiny_model_dir}, "data": fields})


def unique_documents(count: int, seed: int = 1) -> list[str]:
    """`count` distinct support-style documents (the index keeps them distinct)."""
    return [f"{i}. {pair['prompt']}{pair['completion']}".replace("\n", " ")
            for i, pair in enumerate(make_pairs(count, seed))]


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return str(path)


def run_pipeline(cfg, tokenizer_path):
    """(counts, {split: [output blocks]}): one streaming pass, with the stats `corpus_statistics`
    collects, keeping every block the tokenizer actors produced (each a dict of arrays)."""
    stats = create_stats()
    blocks = {}
    for split, dataset in build_datasets(cfg, tokenizer_path, stats).items():
        blocks[split] = list(dataset.iter_batches(batch_size=None, batch_format="numpy"))
    totals = ray.get(stats.totals.remote())
    ray.kill(stats)
    return totals, blocks


def rows(blocks: list[dict], column: str) -> np.ndarray:
    return np.concatenate([block[column] for block in blocks]) if blocks else np.zeros((0, 0))


def text_tokens(tokenizer, docs: list[str]) -> int:
    """Causal-LM tokens: each non-empty document's tokens plus one EOS."""
    return sum(len(tokenizer(doc)["input_ids"]) + 1 for doc in docs if doc.strip())


def check_block_invariants(blocks: list[dict], block_size: int, pad_id: int) -> None:
    """Every row is block_size long, padding only at the end of a row, labels mask padding."""
    for block in blocks:
        ids, mask, labels = block["input_ids"], block["attention_mask"], block["labels"]
        assert ids.shape == mask.shape == labels.shape and ids.shape[1] == block_size
        for row_mask in mask:
            length = int(row_mask.sum())
            assert length >= 1 and (row_mask[:length] == 1).all() and (row_mask[length:] == 0).all()
        assert (ids[mask == 0] == pad_id).all()
        np.testing.assert_array_equal(labels, np.where(mask == 1, ids, IGNORE_INDEX))


# ── Input formats ───────────────────────────────────────────────────────────────────────────


def _text_corpus(tmp_path, docs):
    # Blank and whitespace-only lines are not documents: they are skipped and counted.
    lines = docs[:10] + ["", "   "] + docs[10:]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    # The one format run with a validation split too (each split costs an actor pool start).
    return str(tmp_path / "corpus.txt"), {"format": "text", "val_fraction": 0.25}, docs, 2


def _jsonl_corpus(tmp_path, docs):
    path = write_jsonl(tmp_path / "corpus.jsonl",
                       ({"id": i, "text": d} for i, d in enumerate(docs)))
    return path, {"format": "jsonl"}, docs, 0


def _parquet_corpus(tmp_path, docs):
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"id": list(range(len(docs))), "body": docs}), path,
                   row_group_size=16)  # several row groups
    return str(path), {"format": "parquet", "text_field": "body"}, docs, 0


def _directory_corpus(tmp_path, docs):
    folder = tmp_path / "shards"
    (folder / "more").mkdir(parents=True)
    write_jsonl(folder / "a.jsonl", ({"text": d} for d in docs[:20]))
    write_jsonl(folder / "b.jsonl", ({"text": d} for d in docs[20:45]))
    write_jsonl(folder / "more" / "c.jsonl", ({"text": d} for d in docs[45:]))
    return str(folder), {"format": "jsonl"}, docs, 0


def _glob_corpus(tmp_path, docs):
    write_jsonl(tmp_path / "part-0.jsonl", ({"text": d} for d in docs[:30]))
    write_jsonl(tmp_path / "part-1.jsonl", ({"text": d} for d in docs[30:]))
    write_jsonl(tmp_path / "other-2.jsonl", ({"text": "not matched " + d} for d in docs))
    return str(tmp_path / "part-*.jsonl"), {"format": "jsonl"}, docs, 0


@pytest.mark.parametrize("make_corpus", [_text_corpus, _jsonl_corpus, _parquet_corpus,
                                         _directory_corpus, _glob_corpus],
                         ids=["text", "jsonl", "parquet", "directory", "glob"])
def test_token_counts_match_the_tokenizer(tmp_path, tiny_model_dir, tokenizer, make_corpus):
    docs = unique_documents(60)
    path, data, docs, blank_lines = make_corpus(tmp_path, docs)
    cfg = make_config(tiny_model_dir, path, **data)
    totals, blocks = run_pipeline(cfg, tiny_model_dir)

    fraction = cfg.data.val_fraction
    expected = {side: [d for d in docs if split_of(d, fraction) == side]
                for side in (("train", "val") if fraction else ("train",))}
    assert all(expected.values()) and set(blocks) == set(expected)
    for side, side_docs in expected.items():
        tokens = text_tokens(tokenizer, side_docs)
        assert totals[f"documents.{side}"] == len(side_docs)
        assert totals[f"tokens.{side}"] == tokens
        assert int(rows(blocks[side], "attention_mask").sum()) == tokens
        assert totals[f"blocks.{side}"] == len(rows(blocks[side], "input_ids"))
        assert totals[f"padding.{side}"] == totals[f"blocks.{side}"] * 32 - tokens
        check_block_invariants(blocks[side], 32, tokenizer.pad_token_id)
    assert totals.get("skipped.empty_text", 0) == blank_lines
    assert sum(v for k, v in totals.items() if k.startswith("skipped.")) == blank_lines


# ── Packing ─────────────────────────────────────────────────────────────────────────────────


def test_blocks_are_the_documents_joined_by_eos(tmp_path, tiny_model_dir, tokenizer):
    docs = ["Short one.", unique_documents(1)[0] * 2, "Hello there, agent.",
            "Customer: My Orbit Watch arrived damaged.\nAgent: We are sorry.",
            "A", "x " * 40, "The last document in the file."]
    path = write_jsonl(tmp_path / "docs.jsonl", ({"text": d} for d in docs))
    cfg = make_config(tiny_model_dir, path, block_size=16, tokenize_batch_size=1000)
    totals, blocks = run_pipeline(cfg, tiny_model_dir)
    assert set(blocks) == {"train"}  # val_fraction 0: no validation dataset at all

    eos = tokenizer.eos_token_id
    stream = [t for d in docs for t in tokenizer(d)["input_ids"] + [eos]]
    assert len(blocks["train"]) == 1  # one tokenizer batch → one output block, in file order
    ids, mask = blocks["train"][0]["input_ids"], blocks["train"][0]["attention_mask"]
    assert ids.shape == (math.ceil(len(stream) / 16), 16)
    assert ids[mask == 1].tolist() == stream
    padding = ids.size - len(stream)
    assert 0 < padding < 16
    assert mask[:-1].all() and int(mask[-1].sum()) == 16 - padding  # only the last block pads
    check_block_invariants(blocks["train"], 16, tokenizer.pad_token_id)
    assert totals == {"documents.train": len(docs), "tokens.train": len(stream),
                      "blocks.train": ids.shape[0], "padding.train": padding}


def test_each_tokenizer_batch_pads_only_its_last_block(tmp_path, tiny_model_dir, tokenizer):
    """Several tokenizer batches: padding ends a batch, never splits a document."""
    docs = unique_documents(24)
    path = write_jsonl(tmp_path / "docs.jsonl", ({"text": d} for d in docs))
    cfg = make_config(tiny_model_dir, path, block_size=16, tokenize_batch_size=5)
    totals, blocks = run_pipeline(cfg, tiny_model_dir)
    check_block_invariants(blocks["train"], 16, tokenizer.pad_token_id)

    # Ray Data may put several batches' rows in one output block; a padded row ends a batch.
    # Cut the rows after each padded row: every piece is whole documents joined by EOS.
    eos = tokenizer.eos_token_id
    found, padded_rows = [], 0
    for block in blocks["train"]:
        piece: list[int] = []
        for ids, mask in _rows_of(block):
            piece += ids[mask == 1].tolist()
            if not mask.all():
                padded_rows += 1
                assert piece[-1] == eos, "a batch ends with a whole document"
                found += _documents(piece, eos)
                piece = []
        assert piece == [], "an output block ends with the padded last row of a batch"
    per_doc = [tuple(tokenizer(d)["input_ids"]) for d in docs]
    assert Counter(found) == Counter(per_doc)
    assert math.ceil(len(docs) / 5) - 1 <= padded_rows < len(docs)
    assert totals["tokens.train"] == sum(len(d) + 1 for d in per_doc)
    assert totals["blocks.train"] == sum(len(b["input_ids"]) for b in blocks["train"])
    assert totals["padding.train"] == sum(int((b["attention_mask"] == 0).sum())
                                          for b in blocks["train"])


def _documents(tokens: list[int], eos: int) -> list[tuple]:
    """Split a token stream that ends with EOS into per-document token tuples."""
    docs, current = [], []
    for token in tokens:
        if token == eos:
            docs.append(tuple(current))
            current = []
        else:
            current.append(token)
    assert current == []
    return docs


def _rows_of(block: dict):
    """(input_ids, attention_mask) per row of an output block."""
    return zip(block["input_ids"], block["attention_mask"], strict=True)


def _row_of(ids: np.ndarray, mask: np.ndarray) -> tuple:
    return tuple(int(t) for t in ids[mask == 1])


def test_prompt_completion_labels_cover_the_completion_only(tmp_path, tiny_model_dir, tokenizer):
    block = 32
    eos = tokenizer.eos_token_id
    pairs = [{"prompt": "Customer: Where is my order?\nAgent:", "completion": " It ships today."},
             {"prompt": "Customer: Refund please.\nAgent:", "completion": " Start the return."},
             {"prompt": "Customer: Hi\nAgent:", "completion": " Hello! " * 30},  # too long
             {"prompt": "Customer: " + "very long question " * 20, "completion": " Sure."},
             {"prompt": "Q:", "completion": " A."}]
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    cfg = make_config(tiny_model_dir, path, prompt_field="prompt", completion_field="completion",
                      block_size=block)

    expected = {}  # non-pad input_ids → labels over them
    truncated = target_tokens = 0
    for pair in pairs:
        prompt = tokenizer(pair["prompt"])["input_ids"]
        completion = tokenizer(pair["completion"], add_special_tokens=False)["input_ids"] + [eos]
        if len(prompt) >= block:
            continue  # the prompt alone fills the block: skipped
        if len(prompt) + len(completion) > block:
            truncated += 1
            completion = completion[: block - len(prompt)]
        expected[tuple(prompt + completion)] = [IGNORE_INDEX] * len(prompt) + completion
        target_tokens += len(completion)
    assert len(expected) == 4 and truncated == 1

    totals, blocks = run_pipeline(cfg, tiny_model_dir)
    ids, mask, labels = (rows(blocks["train"], c) for c in ("input_ids", "attention_mask",
                                                             "labels"))
    assert ids.shape == (4, block)
    got = {}
    for row_ids, row_mask, row_labels in zip(ids, mask, labels, strict=True):
        length = int(row_mask.sum())
        assert (row_labels[length:] == IGNORE_INDEX).all()
        assert (row_ids[length:] == tokenizer.pad_token_id).all()
        got[_row_of(row_ids, row_mask)] = row_labels[:length].tolist()
    assert got == expected
    full = [r for r in expected if len(r) == block]
    assert len(full) == 1 and full[0][-1] != eos  # the truncated one lost its EOS
    assert totals == {
        "documents.train": 5, "skipped.prompt_too_long": 1, "truncated.train": 1,
        "tokens.train": sum(map(len, expected)), "blocks.train": 4,
        "padding.train": 4 * block - sum(map(len, expected)), "target_tokens.train": target_tokens,
        # What packing would leave (the summary prints both): one row per packed group.
        "padding_unpacked.train": 4 * block - sum(map(len, expected)),
        "padding_packed.train": len(pack_lengths(list(map(len, expected)), block)) * block
        - sum(map(len, expected))}


# ── Train/validation split ──────────────────────────────────────────────────────────────────


def test_split_is_deterministic_disjoint_and_by_document(tmp_path, tiny_model_dir, tokenizer):
    pairs = [{"prompt": f"Customer: question {i}?\nAgent:", "completion": f" Answer {i}."}
             for i in range(120)]
    repeated = pairs[7]
    # The same document in two places (and two files) must land on one side every time.
    write_jsonl(tmp_path / "a.jsonl", pairs[:60] + [repeated])
    write_jsonl(tmp_path / "b.jsonl", pairs[60:] + [repeated, repeated])
    cfg = make_config(tiny_model_dir, str(tmp_path / "*.jsonl"), prompt_field="prompt",
                      completion_field="completion", val_fraction=0.3)

    _, blocks = run_pipeline(cfg, tiny_model_dir)
    first = {side: Counter(tokenizer.decode(list(_row_of(ids, mask)), skip_special_tokens=True)
                           for block in blocks[side] for ids, mask in _rows_of(block))
             for side in ("train", "val")}
    # A second run, of the read step alone (where the split is decided: it is cheap), agrees.
    second = {side: Counter(row["prompt"] + row["completion"]
                            for row in read_corpus(cfg, side).iter_rows())
              for side in ("train", "val")}
    assert first == second
    train, val = set(first["train"]), set(first["val"])
    everything = {p["prompt"] + p["completion"] for p in pairs}
    assert train.isdisjoint(val) and train | val == everything
    assert val == {d for d in everything if split_of(d, 0.3) == "val"}
    assert 0.15 < len(val) / len(everything) < 0.45
    text = repeated["prompt"] + repeated["completion"]
    side = split_of(text, 0.3)
    assert first[side][text] == 4 and text not in first["val" if side == "train" else "train"]


# ── Bad rows ────────────────────────────────────────────────────────────────────────────────

BAD_ROWS = [
    json.dumps({"text": "A good document."}).encode(),
    b'{"text": "unterminated',  # line 2: invalid_json
    json.dumps({"body": "wrong field"}).encode(),  # missing_field
    json.dumps({"text": 42}).encode(),  # wrong_type
    json.dumps({"text": ""}).encode(),  # empty_text
    b"\xff\xfe\x00bad bytes",  # undecodable
    json.dumps({"text": "Another good one."}).encode(),
    json.dumps(["a", "list"]).encode(),  # invalid_json
    json.dumps({"text": None}).encode(),  # missing_field
    json.dumps({"text": {"nested": "x"}}).encode(),  # wrong_type
    b"",  # empty_text (a blank line)
    json.dumps({"text": "  \t "}).encode(),  # empty_text
    b'{"text": "caf\xe9 in latin-1"}',  # undecodable
    json.dumps({"text": "Third good document."}).encode(),
]
BAD_COUNTS = {"skipped.invalid_json": 2, "skipped.missing_field": 2, "skipped.wrong_type": 2,
              "skipped.empty_text": 3, "skipped.undecodable": 2}


@pytest.fixture
def bad_rows_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(BAD_ROWS) + b"\n")
    return str(path)


def test_bad_rows_are_skipped_and_counted_by_reason(bad_rows_file, tiny_model_dir, tokenizer):
    cfg = make_config(tiny_model_dir, bad_rows_file)
    totals = corpus_statistics(cfg, tiny_model_dir)
    good = ["A good document.", "Another good one.", "Third good document."]
    tokens = text_tokens(tokenizer, good)
    assert totals == {**BAD_COUNTS, "documents.train": 3, "tokens.train": tokens,
                      "blocks.train": math.ceil(tokens / 32),
                      "padding.train": math.ceil(tokens / 32) * 32 - tokens}
    skipped_line = format_statistics(cfg, totals, [bad_rows_file]).splitlines()[-1]
    assert skipped_line == ("skipped     11 rows (invalid_json 2, missing_field 2, wrong_type 2, "
                            "empty_text 3, undecodable 2)")


def _data_error(exc: BaseException) -> DataError | None:
    """The DataError raised in a read task, however Ray wrapped it."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DataError) and getattr(exc, "cause", None) is None:
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None


def test_strict_mode_fails_on_the_first_bad_row_naming_file_and_line(bad_rows_file,
                                                                      tiny_model_dir):
    cfg = make_config(tiny_model_dir, bad_rows_file, strict=True)
    with pytest.raises(Exception) as info:
        for dataset in build_datasets(cfg, tiny_model_dir).values():
            for _ in dataset.iter_batches(batch_size=None):
                pass
    error = _data_error(info.value)
    assert error is not None, f"no DataError in {info.value!r}"
    # Ray Data appends its retry advice to the message as further lines; ours is the first.
    assert str(error).splitlines()[0] == (f"{bad_rows_file} line 2: invalid json (data.strict "
                                          "is true; set it false to skip and count bad rows)")
    assert f"{bad_rows_file} line 2: invalid json" in str(info.value)


@pytest.fixture(scope="module")
def strict_cli_run(tmp_path_factory, tiny_model_dir, ray_cluster):
    """`aigc-ray data … data.strict=true` on a file whose first bad row is line 3 (undecodable)."""
    path = tmp_path_factory.mktemp("strict") / "corpus.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "also fine"}\n\xff\xfe oops\n{"text": "x"}\n')
    stderr, stdout = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
        code = main(["data", f"data.path={path}", "data.format=jsonl", "data.prompt_field=null",
                     "data.completion_field=null", "data.strict=true",
                     f"model.name_or_path={tiny_model_dir}"])
    return code, stdout.getvalue(), stderr.getvalue(), str(path)


def test_cli_strict_mode_exits_2_naming_file_and_line(strict_cli_run):
    code, out, err, path = strict_cli_run
    assert code == 2
    assert out == ""
    assert err.count("error: ") == 1
    assert f"{path} line 3: undecodable (data.strict is true" in err


def test_cli_strict_mode_error_is_one_line(strict_cli_run):
    _, _, err, path = strict_cli_run
    assert err == (f"error: {path} line 3: undecodable (data.strict is true; set it false to skip "
                   "and count bad rows)\n")


def test_duplicate_documents_are_all_counted(tmp_path, tiny_model_dir, tokenizer):
    docs = ["Thanks!", "A first, longer document with many words.", "Thanks!", "Short."]
    path = tmp_path / "dup.txt"
    path.write_text("\n".join(docs) + "\n")
    cfg = make_config(tiny_model_dir, str(path), format="text", tokenize_batch_size=2)
    assert corpus_statistics(cfg, tiny_model_dir)["tokens.train"] == text_tokens(tokenizer, docs)


# ── A tokenizer actor that dies is restarted ────────────────────────────────────────────────


def test_a_killed_tokenizer_actor_is_restarted_and_nothing_is_lost_or_counted_twice(
        tmp_path, tiny_model_dir, tokenizer):
    """Why `tokenize` keeps Ray Data's actor restarts (and so Ray's warning about constructor
    arguments in the object store): the tokenizer actor's process is killed mid-pass, and the
    pass still ends with every document's tokens, once."""
    import signal
    import threading
    import time

    from ray.util.state import list_actors

    docs = unique_documents(1200, seed=5)
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(docs) + "\n")
    cfg = make_config(tiny_model_dir, str(path), format="text", tokenize_batch_size=2)
    stats = create_stats()
    dataset = build_datasets(cfg, tiny_model_dir, stats)["train"]
    killed: list[tuple[int, int]] = []  # (pid, blocks counted before the kill)

    def kill_the_tokenizer_once_it_has_started():
        address = ray.get_runtime_context().gcs_address
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            blocks = ray.get(stats.totals.remote()).get("blocks.train", 0)
            actors = [actor for actor in list_actors(address=address,
                                                     filters=[("state", "=", "ALIVE")])
                      if "TokenizeAndPack" in actor.class_name] if blocks else []
            if actors:
                os.kill(actors[0].pid, signal.SIGKILL)
                killed.append((actors[0].pid, blocks))
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_tokenizer_once_it_has_started, daemon=True)
    killer.start()
    blocks = list(dataset.iter_batches(batch_size=None, batch_format="numpy"))
    killer.join(timeout=5)
    totals = ray.get(stats.totals.remote())
    ray.kill(stats)
    assert killed, "the pass ended before the tokenizer actor could be killed"
    assert killed[0][1] < totals["blocks.train"]  # killed mid-pass
    tokens = text_tokens(tokenizer, docs)
    assert totals["tokens.train"] == tokens == int(rows(blocks, "attention_mask").sum())
    assert totals["blocks.train"] == len(rows(blocks, "input_ids"))


# ── Hugging Face datasets folders ───────────────────────────────────────────────────────────


@pytest.mark.parametrize("layout", ["dataset", "dataset_dict"])
def test_hf_save_to_disk_folder(tmp_path, tiny_model_dir, tokenizer, layout):
    import datasets

    docs = unique_documents(40)
    train = datasets.Dataset.from_dict({"text": docs, "id": list(range(len(docs)))})
    if layout == "dataset":
        train.save_to_disk(str(tmp_path / "hf"))
    else:  # hf_split picks the split folder
        other = datasets.Dataset.from_dict({"text": ["held out"] * 3, "id": [0, 1, 2]})
        datasets.DatasetDict({"train": train, "test": other}).save_to_disk(str(tmp_path / "hf"))
    cfg = make_config(tiny_model_dir, str(tmp_path / "hf"), format="hf")
    totals, blocks = run_pipeline(cfg, tiny_model_dir)
    tokens = text_tokens(tokenizer, docs)
    assert totals["documents.train"] == 40
    assert totals["tokens.train"] == tokens == int(rows(blocks["train"], "attention_mask").sum())


def hf_corpus(folder, docs: list[str], bad: dict[int, str | None]) -> str:
    """A `save_to_disk` folder of `docs` with the `bad` texts inserted at those row indices."""
    import datasets

    texts = list(docs)
    for index in sorted(bad):
        texts.insert(index, bad[index])
    datasets.Dataset.from_dict({"text": texts, "id": list(range(len(texts)))}).save_to_disk(
        str(folder))
    return str(folder)


def test_hf_rows_keep_their_numbers_across_object_store_blocks(tmp_path, tiny_model_dir):
    """Slices of 15 rows, each read by its own task: every row is named by its row in the file,
    bad rows are counted once, and strict mode names the first bad row (past the first slice)."""
    docs = unique_documents(40)
    path = hf_corpus(tmp_path / "hf", docs, {20: None, 25: "  ", 35: ""})
    cfg = make_config(tiny_model_dir, path, format="hf", val_fraction=0.25)
    blocks = hf_blocks(resolve_files(cfg.data), cfg.data, rows_per_task=15)
    assert [(block.first_row, block.rows) for block in blocks] == [(1, 15), (16, 15), (31, 13)]
    stats = create_stats()
    read = list(read_corpus(cfg, None, stats, blocks).iter_rows())
    totals = ray.get(stats.totals.remote())
    ray.kill(stats)
    names = [int(row["_aigc_row"].rsplit(":", 1)[1]) for row in read]
    assert sorted(names) == [n for n in range(1, 44) if n not in (21, 26, 36)]
    assert sorted(row["text"] for row in read) == sorted(docs)
    val = sum(split_of(doc, 0.25) == "val" for doc in docs)
    assert totals == {"documents.train": 40 - val, "documents.val": val,
                      "skipped.missing_field": 1, "skipped.empty_text": 2}

    strict = make_config(tiny_model_dir, path, format="hf", strict=True)
    with pytest.raises(Exception) as info:
        list(read_corpus(strict, None, files=blocks).iter_rows())
    error = _data_error(info.value)
    assert error is not None, f"no DataError in {info.value!r}"
    assert str(error).splitlines()[0].startswith(f"{blocks[1].path} line 21: missing field ")


# A driver on the head node of a two-node cluster: it plans the hf pipeline, deletes the
# dataset's folder, then runs the pipeline and prints its counts as JSON.
TWO_NODE_DRIVER = """
import json, shutil, sys
import ray
from aigc_ray.config import validate
from aigc_ray.data import build_datasets, create_stats

config, tokenizer_path, folder = json.loads(sys.argv[1])
ray.init(logging_level="ERROR")
ray.data.DataContext.get_current().enable_progress_bars = False
stats = create_stats()
datasets = build_datasets(validate(config), tokenizer_path, stats)
shutil.rmtree(folder)
tokens = {split: sum(int(b["attention_mask"].sum()) for b in
                     dataset.iter_batches(batch_size=None, batch_format="numpy"))
          for split, dataset in datasets.items()}
print(json.dumps({"tokens": tokens, "totals": ray.get(stats.totals.remote())}))
"""


def test_hf_dataset_is_read_on_a_node_without_its_files(tmp_path, tiny_model_dir, tokenizer):
    """The head (the driver's node) has no CPU, so every read task and tokenizer actor runs on
    the other node; the dataset's folder is deleted once the pipeline is planned, so the rows
    can only have reached that node through the object store, never as a path to a file."""
    from ray.cluster_utils import Cluster

    docs = unique_documents(60, seed=3)
    folder = hf_corpus(tmp_path / "hf", docs, {5: None, 50: " "})
    config = {"model": {"name_or_path": tiny_model_dir},
              "data": {"path": folder, "format": "hf", "block_size": 32, "val_fraction": 0.2,
                       "prompt_field": None, "completion_field": None}}
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        done = subprocess.run(
            [sys.executable, "-c", TWO_NODE_DRIVER, json.dumps([config, tiny_model_dir, folder])],
            env={**os.environ, "RAY_ADDRESS": cluster.address, "TOKENIZERS_PARALLELISM": "false"},
            capture_output=True, text=True, timeout=180)
    finally:
        cluster.shutdown()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not (tmp_path / "hf").exists()
    result = json.loads(done.stdout.strip().splitlines()[-1])
    by_split = {side: [doc for doc in docs if split_of(doc, 0.2) == side]
                for side in ("train", "val")}
    assert result["tokens"] == {side: text_tokens(tokenizer, split_docs)
                                for side, split_docs in by_split.items()}
    totals = result["totals"]
    assert (totals["documents.train"], totals["documents.val"]) == (
        len(by_split["train"]), len(by_split["val"]))
    assert (totals["skipped.missing_field"], totals["skipped.empty_text"]) == (1, 1)
    assert totals["tokens.train"] == result["tokens"]["train"]


# ── The built-in model folder ───────────────────────────────────────────────────────────────


def test_builtin_model_round_trips_through_transformers(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert model.config.model_type == "gpt2"
    assert (model.config.n_layer, model.config.n_embd) == (2, 64)
    assert len(tokenizer) <= 512 and model.config.vocab_size == len(tokenizer)
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id

    text = "Customer: How do I reset my password for Nimbus Drive?\nAgent:"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text  # byte-level BPE loses nothing
    assert len(ids) < len(text) / 2  # trained on this corpus: common words are single tokens

    inputs = tokenizer([text], return_tensors="pt")
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (1, len(ids) + 5)
    assert out[0, : len(ids)].tolist() == ids
    assert isinstance(tokenizer.decode(out[0, len(ids):]), str)


# ── Order: training never follows file order ────────────────────────────────────────────────


def test_a_streamed_training_split_reads_its_files_in_a_new_seeded_order_each_pass(tmp_path,
                                                                                   tiny_model_dir):
    """data.shuffle (true): each pass over the training files (an epoch) takes them in another
    order drawn from train.seed; the same seed gives the same orders; validation is never
    reordered; data.shuffle=false keeps file order."""
    paths = [write_jsonl(tmp_path / f"part-{i}.jsonl", [{"text": f"file {i} row {j}"}
                                                        for j in range(3)]) for i in range(6)]

    def file_orders(cfg, split: str, passes: int) -> list[list[str]]:
        dataset = read_corpus(cfg, split)
        dataset.context.execution_options.preserve_order = True
        orders = []
        for _ in range(passes):
            rows = [row["text"] for row in dataset.iter_rows()]
            orders.append(list(dict.fromkeys(text.split(" row")[0] for text in rows)))
        return orders

    cfg = make_config(tiny_model_dir, paths)
    orders = file_orders(cfg, "train", 3)
    in_file_order = [f"file {i}" for i in range(6)]
    assert all(sorted(order) == in_file_order for order in orders)
    assert len({tuple(order) for order in orders}) == 3, orders  # a new order each pass
    assert file_orders(cfg, "train", 3) == orders  # and the same ones for the same seed
    reseeded = validate({**cfg.model_dump(), "train": {**cfg.train.model_dump(), "seed": 1}})
    assert file_orders(reseeded, "train", 1)[0] != orders[0]
    unshuffled = make_config(tiny_model_dir, paths, shuffle=False)
    assert file_orders(unshuffled, "train", 2) == [in_file_order] * 2


def test_a_global_shuffle_is_a_new_seeded_permutation_of_every_block_each_epoch(
        tiny_model_dir, tmp_path):
    """data.shuffle=global: what Ray Train splits among the workers is a Ray Data random_shuffle
    of the whole (cached) split, reseeded each epoch from train.seed."""
    import ray.data

    from aigc_ray.data.cache import TrainingSplit
    from aigc_ray.train.driver import training_input

    cfg = make_config(tiny_model_dir, write_jsonl(tmp_path / "c.jsonl", []), shuffle="global")

    def epochs(count: int) -> list[list[int]]:
        """`count` epochs of a run: a new cached split each run, as run_train makes one."""
        blocks = ray.data.from_items([{"input_ids": np.full(4, i, np.int32)} for i in range(64)],
                                     override_num_blocks=4).materialize()
        split = TrainingSplit(blocks, 64, 1024, "cached", blocks=["unused"], order_hash="x")
        dataset, cached_blocks = training_input(cfg, split)
        assert cached_blocks is None  # the workers read Ray Train's shards, not the cache
        return [[int(row["input_ids"][0]) for row in dataset.iter_rows()] for _ in range(count)]

    orders = epochs(2)
    assert all(sorted(order) == list(range(64)) for order in orders)
    assert orders[0] != orders[1] and list(range(64)) not in orders
    assert epochs(2) == orders  # the same seed: the same epochs
