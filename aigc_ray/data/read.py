"""Reading a corpus with Ray Data: files streamed by read tasks (or a Hugging Face dataset's
rows through the object store), each row validated where it is read, documents split into
train and validation by a hash of their text; the `DataStats` actor counts what was skipped.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from aigc_ray.config import Config, Data
from aigc_ray.data.chat import CHAT_SKIP_REASONS, conversation, detect_format
from aigc_ray.data.files import resolve_files
from aigc_ray.errors import DataError

ROWS_PER_BLOCK = 4096  # rows per Ray Data block out of a read task


HF_ROWS_PER_TASK = 8 * ROWS_PER_BLOCK  # rows of an hf dataset per object-store block/read task


HF_BYTES_PER_TASK = 64 << 20  # ... or fewer, when its rows are long


READ_CHUNK_BYTES = 1 << 20


SKIP_REASONS = ("invalid_json", "missing_field", "wrong_type", "empty_text", "undecodable",
                "prompt_too_long", "unknown_format", *CHAT_SKIP_REASONS)


ROW_COLUMN = "_aigc_row"  # "path:line" of each document: keys tokenizer counts per batch


MESSAGES_COLUMN = "_aigc_messages"  # a conversation's messages as JSON, in chat mode


def split_of(document: str, val_fraction: float) -> str:
    """'val' or 'train', decided by a hash of the document alone: stable across runs."""
    digest = hashlib.blake2b(document.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "big") / 2**64 < val_fraction else "train"


def _iter_lines(f) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, raw bytes) for each line of a byte stream, read in chunks."""
    pending, number = b"", 0
    while True:
        chunk = f.read(READ_CHUNK_BYTES)
        if not chunk:
            break
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        for line in lines:
            number += 1
            yield number, line
    if pending:
        yield number + 1, pending


def iter_records(f, data: Data, first_row: int = 1) -> Iterator[tuple[int, object]]:
    """(row number from `first_row`, record) where a record is a dict, or a skip reason string.
    For `hf`, `f` is a table of the dataset's rows (a block from `hf_blocks`)."""
    if data.format in ("text", "jsonl"):
        for number, raw in _iter_lines(f):
            try:
                line = raw.rstrip(b"\r").decode("utf-8")
            except UnicodeDecodeError:
                yield number, "undecodable"
                continue
            if data.format == "text":
                yield number, {data.text_field: line}
                continue
            if not line.strip():
                yield number, "empty_text"
                continue
            try:
                record = json.loads(line)
            except ValueError:
                yield number, "invalid_json"
                continue
            yield number, record if isinstance(record, dict) else "invalid_json"
        return
    if data.format == "parquet":
        import pyarrow.parquet as pq

        batches = pq.ParquetFile(f).iter_batches(batch_size=ROWS_PER_BLOCK)
    else:
        batches = f.to_batches(max_chunksize=ROWS_PER_BLOCK)
    number = first_row - 1
    for batch in batches:
        for record in batch.to_pylist():
            number += 1
            yield number, record


def field_text(record: dict, name: str) -> object:
    """The field's text, or a skip reason string."""
    if name not in record or record[name] is None:
        return "missing_field"
    value = record[name]
    if not isinstance(value, str):
        return "wrong_type"
    return value if value.strip() else "empty_text"


def document_text(row: dict, data: Data) -> str:
    """The text that identifies a document (for the split hash and the tokenizer corpus)."""
    if data.chat:
        return "\n".join(f"{m['role']}: {m['content']}" for m in json.loads(row[MESSAGES_COLUMN]))
    if data.supervised:
        return row[data.prompt_field] + row[data.completion_field]
    return row[data.text_field]


def row_columns(data: Data) -> list[str]:
    """The columns a validated document has."""
    if data.chat:
        return [MESSAGES_COLUMN]
    return [data.prompt_field, data.completion_field] if data.supervised else [data.text_field]


def validate_record(record: object, data: Data) -> object:
    """A clean row dict with the fields training needs, or a skip reason string. A
    conversation's row also names the chat format it was read as (key "chat_format")."""
    if isinstance(record, str):
        return record
    if data.chat:
        chat_format = (detect_format(record, data.chat_fields) if data.chat_format == "auto"
                       else data.chat_format)
        if chat_format is None:
            return "unknown_format"
        messages = conversation(record, chat_format, data.chat_fields)
        if isinstance(messages, str):
            return messages
        return {MESSAGES_COLUMN: json.dumps(messages, ensure_ascii=False),
                "chat_format": chat_format}
    fields = row_columns(data)
    row = {}
    for name in fields:
        value = field_text(record, name)
        if value in SKIP_REASONS:
            return value
        row[name] = value
    return row


def stream_datasource(files: list[str], parquet: bool, read_stream, shuffle_seed: int | None = None):
    """A Ray Data datasource whose read tasks run `read_stream(f, path)` (yielding pyarrow
    tables) over each file; built lazily so importing this module needs no Ray cluster.
    `shuffle_seed`: the files are read in an order drawn from it and the pass's number (Ray
    Data's FileShuffleConfig), a new order each epoch and the same one for the same seed."""
    from ray.data.datasource import FileBasedDatasource, FileShuffleConfig

    class _Stream(FileBasedDatasource):
        def _open_input_source(self, filesystem, path, **open_args):
            if parquet:  # parquet needs random access
                return filesystem.open_input_file(path)
            return super()._open_input_source(filesystem, path, **open_args)

        def _read_stream(self, f, path: str) -> Iterator:
            yield from read_stream(f, path)

    shuffle = None if shuffle_seed is None else FileShuffleConfig(shuffle_seed,
                                                                  reseed_after_execution=True)
    return _Stream(files, shuffle=shuffle)


@dataclass
class HFBlock:
    """Rows of a Hugging Face dataset's arrow file, put in the object store by the driver."""

    path: str  # the driver's arrow file: names the rows in counts and errors, never opened again
    first_row: int  # of the file, from 1
    rows: int
    size_bytes: int
    ref: object  # ObjectRef of a pyarrow Table


def _hf_columns(table: pa.Table, data: Data) -> pa.Table:
    """Only the columns the documents are made of (conversations keep every column: which ones
    hold a conversation depends on its format). A missing column keeps the table whole, so
    its rows are counted as missing_field."""
    if data.chat:
        return table
    wanted = row_columns(data)
    return table.select(wanted) if set(wanted) <= set(table.column_names) else table


def hf_blocks(files: list[str], data: Data, rows_per_task: int = HF_ROWS_PER_TASK) -> list:
    """The rows of a Hugging Face dataset's arrow files (from `resolve_files`), put in the object
    store in slices of at most `rows_per_task` rows (and about HF_BYTES_PER_TASK bytes).

    This is how `ray.data.from_huggingface` reads a `datasets.Dataset` on a cluster: the driver,
    the one node whose cache holds the files, memory-maps them and puts their rows in the object
    store, from where read tasks on any node fetch them; the files themselves, local to the
    driver, are never opened by a task. The driver never holds the corpus in its own memory
    (the tables are memory maps; each slice is copied to the object store in turn), but the
    object store holds the whole dataset, spilling to disk past its size.
    """
    import ray

    blocks = []
    for path in files:
        # datasets' arrow files are Arrow IPC streams; read from a memory map, zero-copy
        table = _hf_columns(pa.ipc.open_stream(pa.memory_map(path)).read_all(), data)
        row_bytes = table.nbytes / max(table.num_rows, 1)
        step = max(1, min(rows_per_task, int(HF_BYTES_PER_TASK / max(row_bytes, 1))))
        for start in range(0, table.num_rows, step):
            piece = table.slice(start, step)
            blocks.append(HFBlock(path, start + 1, piece.num_rows, piece.nbytes, ray.put(piece)))
    return blocks


def hf_datasource(blocks: list[HFBlock], read_table, shuffle_seed: int | None = None):
    """A Ray Data datasource with one read task per `HFBlock`, which runs
    `read_table(table, path, first_row)` (yielding pyarrow tables) on the block's rows;
    with `shuffle_seed`, in an order drawn from it and the pass's number, as for files."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    def read_task(block: HFBlock):
        def read():
            import ray

            yield from read_table(ray.get(block.ref), block.path, block.first_row)
        return read

    class _HFBlocks(Datasource):
        def get_name(self) -> str:
            return "HuggingFace"

        def estimate_inmemory_data_size(self) -> int:
            return sum(block.size_bytes for block in blocks)

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            order = list(blocks)
            if shuffle_seed is not None:
                execution = data_context._execution_idx if data_context is not None else 0
                seeded_rng(shuffle_seed, execution).shuffle(order)
            return [ReadTask(read_task(block),
                             BlockMetadata(num_rows=None, size_bytes=block.size_bytes,
                                           input_files=[block.path], exec_stats=None),
                             per_task_row_limit=per_task_row_limit)
                    for block in order]

    return _HFBlocks()


def read_documents(f, path: str, data: Data, split: str | None, stats,
                   first_row: int = 1) -> Iterator[pa.Table]:
    """Yield blocks of valid documents from one file, or from the part of one that starts at
    row `first_row` (only `split`'s documents when given).

    Every block's counts go to `stats` under a key naming the file and first row, so re-reading
    a file (a second split, a second epoch, a retried task) never counts twice.
    """
    rows: list[dict] = []
    counts: Counter = Counter()
    first = first_row
    for number, record in iter_records(f, data, first_row):
        row = validate_record(record, data)
        if isinstance(row, str):
            if data.strict:
                raise DataError(f"{path} line {number}: {row.replace('_', ' ')} "
                                f"(data.strict is true; set it false to skip and count bad rows)")
            counts[f"skipped.{row}"] += 1
        else:
            side = split_of(document_text(row, data), data.val_fraction)
            counts[f"documents.{side}"] += 1
            if "chat_format" in row:
                counts[f"chat_format.{row.pop('chat_format')}"] += 1
            if split is None or side == split:
                rows.append({**row, ROW_COLUMN: f"{path}:{number}"})
        if number - first + 1 >= ROWS_PER_BLOCK:
            yield from _flush(rows, counts, stats, path, first, data)
            rows, counts, first = [], Counter(), number + 1
    yield from _flush(rows, counts, stats, path, first, data)


def _flush(rows, counts, stats, path, first, data: Data) -> Iterator[pa.Table]:
    if stats is not None and counts:
        ray_get(stats.record.remote(f"read:{path}:{first}", dict(counts)))
    if rows:
        names = row_columns(data) + [ROW_COLUMN]
        yield pa.table({name: [row[name] for row in rows] for name in names})


def ray_get(ref):
    """Wait for a stats update, so totals read afterwards include it."""
    import ray

    return ray.get(ref)


def _stats_actor_class():
    import ray

    @ray.remote(num_cpus=0)
    class DataStats:
        """Counts (and optional details) from read tasks and actors, keyed so a re-read or a
        retried task never counts twice."""

        def __init__(self):
            self.by_key: dict[str, dict] = {}
            self.details_by_key: dict[str, list] = {}
            self.times_recorded: Counter = Counter()

        def record(self, key: str, counts: dict, details: list | None = None) -> None:
            self.by_key[key] = counts
            self.times_recorded[key] += 1
            if details:
                self.details_by_key[key] = details

        def details(self) -> list:
            """What the recorders listed (e.g. which rows were skipped and why), in key order."""
            return [d for key in sorted(self.details_by_key) for d in self.details_by_key[key]]

        def passes(self, prefix: str) -> int:
            """How many times the most-recorded key under `prefix` was recorded: the number of
            passes the pipeline made over that stage (e.g. 'tokenize:train')."""
            return max((n for key, n in self.times_recorded.items() if key.startswith(prefix)),
                       default=0)

        def totals(self) -> dict:
            total: Counter = Counter()
            for counts in self.by_key.values():
                total.update(counts)
            return dict(total)

    return DataStats


HEAD_NODE = "node:__internal_head__"  # the resource only Ray's head node has


def create_stats():
    """A `DataStats` actor handle; pass it to `build_datasets` and read `totals()` later. It
    lives on the head node, which outlives the run: on a worker node a spot reclaim would take
    the counts with it. (Placed by node, not by the head's resource: inside a Tune trial's
    placement group a resource request must fit the group's bundles.)"""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    (head,) = [node["NodeID"] for node in ray.nodes()
               if node["Alive"] and HEAD_NODE in node["Resources"]]
    return _stats_actor_class().options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)).remote()


def corpus_source(cfg: Config, files: list) -> list:
    """What read tasks read: the corpus files, or for `data.format: hf` their rows put in the
    object store (`hf_blocks`). A run that reads the corpus more than once (both splits, a model
    and its baseline) makes this once and hands it to every `read_corpus`, so an hf dataset is
    put once; given its own result, it returns it as is."""
    if cfg.data.format != "hf" or (files and isinstance(files[0], HFBlock)):
        return files
    return hf_blocks(files, cfg.data)


def read_corpus(cfg: Config, split: str | None = None, stats=None, files=None):
    """The validated documents of one split ('train', 'val', or None for all) as a Dataset,
    read from `files` (from `resolve_files`, or `corpus_source`; None: the config's)."""
    import ray

    data = cfg.data
    files = corpus_source(cfg, files if files is not None else resolve_files(data))
    # Training reads its files in a new order every epoch (see `data.shuffle`).
    seed = cfg.train.seed if split == "train" and data.shuffle is True else None
    if data.format == "hf":
        def read_table(table, path: str, first_row: int) -> Iterator[pa.Table]:
            return read_documents(table, path, data, split, stats, first_row)

        source = hf_datasource(files, read_table, seed)
    else:
        def read_stream(f, path: str) -> Iterator[pa.Table]:
            return read_documents(f, path, data, split, stats)

        source = stream_datasource(files, data.format == "parquet", read_stream, seed)
    return ray.data.read_datasource(source, num_cpus=data.cpus_per_task)


def seeded_rng(seed: int, *keys: int) -> np.random.Generator:
    """A generator drawn from the run's seed and keys (an epoch, a pass, a rank): the same in
    every run, and any int seed works (numpy refuses negative entropy)."""
    return np.random.default_rng([seed % 2**63, *keys])


def corpus_sample(cfg: Config, limit: int) -> Iterator[str]:
    """Up to `limit` documents of the training split, streamed (for training a tokenizer)."""
    for batch in read_corpus(cfg, "train").limit(limit).iter_batches(batch_format="pyarrow"):
        for row in batch.to_pylist():
            yield document_text(row, cfg.data)
