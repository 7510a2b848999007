"""The Ray-free parts of the data pipeline: the train/validation split, resolving `data.path`,
validating rows, reading lines in chunks, counting and strict mode."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pytest

import aigc_ray.data.read as data_module
from aigc_ray.config import validate
from aigc_ray.data.files import resolve_files
from aigc_ray.data.read import read_documents, split_of, validate_record
from aigc_ray.errors import DataError

# ── Data: split ─────────────────────────────────────────────────────────────────────────────


def test_split_is_deterministic_and_roughly_the_fraction():
    documents = [f"document number {i}: some text" for i in range(10_000)]
    first = [split_of(doc, 0.1) for doc in documents]
    assert first == [split_of(doc, 0.1) for doc in documents]
    val = first.count("val")
    assert 900 <= val <= 1100  # 10% of 10k, ± more than 3 standard deviations (30)
    assert set(first) == {"train", "val"}


def test_split_grows_val_without_moving_documents_back_to_train():
    documents = [f"doc {i}" for i in range(5_000)]
    small = {doc for doc in documents if split_of(doc, 0.05) == "val"}
    large = {doc for doc in documents if split_of(doc, 0.2) == "val"}
    assert small < large
    assert 150 <= len(small) <= 350 and 850 <= len(large) <= 1150


def test_split_edges():
    documents = [f"doc {i}" for i in range(2_000)]
    assert {split_of(doc, 0.0) for doc in documents} == {"train"}
    assert split_of("héllo wörld ✓", 0.5) == split_of("héllo wörld ✓", 0.5)
    split_of("lone surrogate \ud800", 0.5)  # must not raise on text json.loads can produce


# ── Data: files ─────────────────────────────────────────────────────────────────────────────


def _data(**fields):
    return validate({"data": {"format": "jsonl", "prompt_field": None,
                              "completion_field": None, **fields}}).data


def test_resolve_a_single_file(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("{}\n")
    assert resolve_files(_data(path=str(path))) == [str(path)]


def test_resolve_a_directory_recursively_sorted_without_hidden_files(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ["b.jsonl", "a.jsonl", "sub/c.jsonl", ".hidden.jsonl", "_SUCCESS"]:
        (tmp_path / name).write_text("{}\n")
    assert resolve_files(_data(path=str(tmp_path))) == [
        str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), str(tmp_path / "sub" / "c.jsonl")]


def test_resolve_a_glob(tmp_path):
    for name in ["part-1.jsonl", "part-0.jsonl", "notes.txt"]:
        (tmp_path / name).write_text("{}\n")
    files = resolve_files(_data(path=str(tmp_path / "part-*.jsonl")))
    assert files == [str(tmp_path / "part-0.jsonl"), str(tmp_path / "part-1.jsonl")]


def test_resolve_a_list_of_paths_keeps_their_order(tmp_path):
    for name in ["x.jsonl", "y.jsonl"]:
        (tmp_path / name).write_text("{}\n")
    paths = [str(tmp_path / "y.jsonl"), str(tmp_path / "x.jsonl")]
    assert resolve_files(_data(path=paths)) == paths


def test_resolve_missing_paths_say_what_is_wrong(tmp_path):
    with pytest.raises(DataError, match=r"^data.path .*nope.jsonl does not exist$"):
        resolve_files(_data(path=str(tmp_path / "nope.jsonl")))
    with pytest.raises(DataError, match="matches no files"):
        resolve_files(_data(path=str(tmp_path / "*.parquet")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is an empty directory"):
        resolve_files(_data(path=str(tmp_path / "empty")))
    with pytest.raises(DataError, match="holds no data-\\*.arrow files"):
        resolve_files(_data(path=str(tmp_path / "empty"), format="hf"))


# ── Data: records ───────────────────────────────────────────────────────────────────────────


def test_validate_record_for_text():
    data = _data(text_field="body")
    assert validate_record({"body": "hello", "id": 3}, data) == {"body": "hello"}
    assert validate_record({"text": "hello"}, data) == "missing_field"
    assert validate_record({"body": None}, data) == "missing_field"
    assert validate_record({"body": 3}, data) == "wrong_type"
    assert validate_record({"body": ["a"]}, data) == "wrong_type"
    assert validate_record({"body": ""}, data) == "empty_text"
    assert validate_record({"body": " \n\t"}, data) == "empty_text"
    assert validate_record("invalid_json", data) == "invalid_json"  # reasons pass through


def test_validate_record_for_pairs():
    data = _data(prompt_field="q", completion_field="a")
    assert validate_record({"q": "Hi?", "a": " Hello.", "id": 1}, data) == {"q": "Hi?",
                                                                           "a": " Hello."}
    assert validate_record({"q": "Hi?"}, data) == "missing_field"
    assert validate_record({"q": 1, "a": "x"}, data) == "wrong_type"
    assert validate_record({"q": "Hi?", "a": "  "}, data) == "empty_text"


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 64])
def test_iter_lines_across_chunk_boundaries(monkeypatch, chunk):
    monkeypatch.setattr(data_module, "READ_CHUNK_BYTES", chunk)
    raw = b"first line\n\nthird, a longer line than any chunk\r\n\xff\xfe\nlast without newline"
    lines = list(data_module._iter_lines(io.BytesIO(raw)))
    assert lines == list(enumerate(raw.split(b"\n"), start=1))
    # A trailing newline ends the last line; it does not start an empty one.
    assert list(data_module._iter_lines(io.BytesIO(b"a\nb\n"))) == [(1, b"a"), (2, b"b")]
    assert list(data_module._iter_lines(io.BytesIO(b""))) == []


def test_read_documents_counts_and_strict_line_numbers(tmp_path):
    """The read step alone (no Ray: stats=None), on every kind of bad row."""
    lines = [json.dumps({"text": "good one"}).encode(), b"{not json", json.dumps([1]).encode(),
             json.dumps({"other": "x"}).encode(), json.dumps({"text": 5}).encode(),
             json.dumps({"text": " "}).encode(), b"", b'{"text": "caf\xff"}',
             json.dumps({"text": "good two"}).encode()]
    raw = b"\n".join(lines) + b"\n"
    data = _data(val_fraction=0.0)
    tables = list(read_documents(io.BytesIO(raw), "corpus.jsonl", data, None, None))
    assert pa.concat_tables(tables).column("text").to_pylist() == ["good one", "good two"]

    strict = _data(val_fraction=0.0, strict=True)
    with pytest.raises(DataError, match=r"^corpus.jsonl line 2: invalid json \(data.strict"):
        list(read_documents(io.BytesIO(raw), "corpus.jsonl", strict, None, None))


def test_read_documents_numbers_hf_rows_from_the_first_row_of_the_block():
    """An hf block (a table of the dataset's rows from `hf_blocks`) that starts at row 4097."""
    table = pa.table({"text": ["one", None, "three", " "], "id": [1, 2, 3, 4]})
    data = _data(format="hf", val_fraction=0.0)
    rows = pa.concat_tables(read_documents(table, "d.arrow", data, None, None, first_row=4097))
    assert rows.column("text").to_pylist() == ["one", "three"]
    assert rows.column(data_module.ROW_COLUMN).to_pylist() == ["d.arrow:4097", "d.arrow:4099"]

    strict = _data(format="hf", val_fraction=0.0, strict=True)
    with pytest.raises(DataError, match=r"^d.arrow line 4098: missing field \(data.strict"):
        list(read_documents(table, "d.arrow", strict, None, None, first_row=4097))


def test_hf_blocks_carry_only_the_document_columns():
    table = pa.table({"text": ["a"], "id": [1], "meta": ["m"]})
    assert data_module._hf_columns(table, _data(format="hf")).column_names == ["text"]
    assert data_module._hf_columns(table, _data(format="hf", text_field="body")) is table
