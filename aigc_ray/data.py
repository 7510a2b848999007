"""The Ray Data pipeline: read → validate and split → clean and tokenize → pack into blocks.

Nothing here collects the corpus into the driver. Files are read as streams by Ray Data read
tasks (through pyarrow filesystems, so local paths and s3://, gs://, file:// URIs take the same
code); a Hugging Face dataset, which lives in the driver's cache, reaches them through the object
store instead (see `hf_blocks`). Each row is validated where it is read, so a bad row is skipped
and counted (or, in strict mode, fails with its file and line); documents go to train or
validation by a hash of their text; tokenizer actors clean, tokenize and pack. Counts flow to a
small `DataStats` actor.
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from aigc_ray.chat import CHAT_SKIP_REASONS, conversation, detect_format, labelled_conversation
from aigc_ray.config import Config, Data
from aigc_ray.errors import ConfigError, DataError
from aigc_ray.tokenizer import IGNORE_INDEX, clean, encoder, load_tokenizer, tokenizer_spec

ROWS_PER_BLOCK = 4096  # rows per Ray Data block out of a read task
HF_ROWS_PER_TASK = 8 * ROWS_PER_BLOCK  # rows of an hf dataset per object-store block/read task
HF_BYTES_PER_TASK = 64 << 20  # ... or fewer, when its rows are long
READ_CHUNK_BYTES = 1 << 20
SKIP_REASONS = ("invalid_json", "missing_field", "wrong_type", "empty_text", "undecodable",
                "prompt_too_long", "unknown_format", *CHAT_SKIP_REASONS)
GLOB_CHARS = set("*?[")
ROW_COLUMN = "_aigc_row"  # "path:line" of each document: keys tokenizer counts per batch
MESSAGES_COLUMN = "_aigc_messages"  # a conversation's messages as JSON, in chat mode


# ── 1. Files ────────────────────────────────────────────────────────────────────────────────


def _is_uri(path: str) -> bool:
    return "://" in path


def _expand_uri_glob(pattern: str) -> list[str]:
    import fnmatch

    from pyarrow import fs as pafs

    filesystem, fs_path = pafs.FileSystem.from_uri(pattern.split("*")[0].rsplit("/", 1)[0] + "/")
    scheme = pattern.split("://", 1)[0]
    selector = pafs.FileSelector(fs_path.rstrip("/"), recursive=True)
    pattern_path = pattern.split("://", 1)[1]
    return sorted(f"{scheme}://{info.path}" for info in filesystem.get_file_info(selector)
                  if info.type == pafs.FileType.File and fnmatch.fnmatch(info.path, pattern_path))


def _hf_files(path: str, split: str) -> list[str]:
    """Arrow files of a `save_to_disk` folder, or of a hub dataset once `datasets` caches it.
    Only the driver reads them (see `hf_blocks`): other nodes of a cluster do not have them."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        if (folder / split / "state.json").exists():  # a DatasetDict: one folder per split
            folder = folder / split
        files = sorted(str(p) for p in folder.glob("data-*.arrow"))
        if not files:
            raise DataError(f"data.path {path} holds no data-*.arrow files; is it a "
                            "datasets save_to_disk folder?")
        return files
    import datasets

    try:
        dataset = datasets.load_dataset(path, split=split)
    except Exception as exc:  # the hub is unreachable, the name is wrong, the split is missing
        raise DataError(f"data.path {path!r}: datasets could not load it "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    return [entry["filename"] for entry in dataset.cache_files]


def resolve_files(data: Data) -> list[str]:
    """Expand `data.path` (files, directories, globs, URIs) into a sorted list of files.

    Local paths are checked here, before Ray starts; object-store URIs are listed by Ray Data.
    """
    files: list[str] = []
    for path in data.paths:
        if data.format == "hf":
            files += _hf_files(path, data.hf_split)
        elif _is_uri(path):
            files += _expand_uri_glob(path) if GLOB_CHARS & set(path) else [path]
        elif GLOB_CHARS & set(path):
            matches = sorted(p for p in glob.glob(str(Path(path).expanduser()), recursive=True)
                             if Path(p).is_file())
            if not matches:
                raise DataError(f"data.path {path!r} matches no files")
            files += matches
        else:
            local = Path(path).expanduser()
            if local.is_dir():
                found = sorted(str(p) for p in local.rglob("*")
                               if p.is_file() and not p.name.startswith((".", "_")))
                if not found:
                    raise DataError(f"data.path {path} is an empty directory")
                files += found
            elif local.is_file():
                files.append(str(local))
            else:
                hint = ("; write the sample corpus with `aigc-ray sample-data data/sample`"
                        if "data/sample" in path else "")
                raise DataError(f"data.path {path} does not exist{hint}")
    return files


FORMAT_BY_EXTENSION = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
                       ".parquet": "parquet", ".txt": "text", ".text": "text"}


def format_of(path: str) -> str | None:
    """The data format a file's extension names (jsonl, parquet, text), or None."""
    return FORMAT_BY_EXTENSION.get(Path(path.split("?")[0]).suffix.lower())


# ── 2. Read, validate, split ────────────────────────────────────────────────────────────────


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


# ── 3. Clean, tokenize, pack ────────────────────────────────────────────────────────────────


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


def ray_get(ref):
    """Wait for a stats update, so totals read afterwards include it."""
    import ray

    return ray.get(ref)


# ── 4. Assemble ─────────────────────────────────────────────────────────────────────────────


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


def create_stats():
    """A `DataStats` actor handle; pass it to `build_datasets` and read `totals()` later."""
    return _stats_actor_class().remote()


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


def build_datasets(cfg: Config, tokenizer_path: str, stats=None, files=None) -> dict:
    """{'train': Dataset, 'val': Dataset} of packed blocks, ready for `get_dataset_shard`.

    Each has columns `input_ids`, `attention_mask`, `labels` ([block_size] int arrays).
    The validation Dataset is absent when `data.val_fraction` is 0.
    """

    files = files if files is not None else resolve_files(cfg.data)  # listed once per run
    splits = ["train", "val"] if cfg.data.val_fraction > 0 else ["train"]
    tokenizer = tokenizer_spec(tokenizer_path, cfg.model.trust_remote_code)  # once for both
    files = corpus_source(cfg, files)  # an hf dataset: put once for both splits
    return {split: tokenize(read_corpus(cfg, split, stats, files), cfg, tokenizer, split, stats)
            for split in splits}


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


# ── 5. Tokenize once for every epoch ────────────────────────────────────────────────────────


@dataclass
class TrainingSplit:
    """The training blocks as the trainer gets them: cached in the object store or streamed."""

    dataset: object  # a MaterializedDataset when cached, else the lazy pipeline
    rows: int | None  # blocks in the split, when a full pass counted them
    cached_bytes: int | None  # None when streaming
    note: str  # one line for the console: what was decided and why
    blocks: list | None = None  # when cached: the object refs of its tables, in the split's order
    order_hash: str | None = None  # when cached: a hash of its blocks in that order (data.json)


def corpus_bytes(files: list[str]) -> int | None:
    """Bytes of the corpus files, or None when a size cannot be read cheaply (object stores)."""
    import os

    try:
        return sum(os.path.getsize(path) for path in files)
    except OSError:
        return None


def epochs_likely(cfg: Config, files: list[str], world_size: int) -> bool:
    """Whether a `train.max_steps` run will probably read the corpus more than once, judged
    from file sizes (about 4 bytes of text per token) before anything is tokenized."""
    size = corpus_bytes(files)
    if size is None or not cfg.train.max_steps:
        return False
    tokens_needed = (cfg.train.max_steps * cfg.train.batch_size * cfg.train.grad_accum_steps
                     * world_size * cfg.data.block_size)
    return size / 4 < tokens_needed


def tokenize_once(dataset, max_bytes: int, count: bool) -> TrainingSplit:
    """Run the pipeline once, keeping its blocks in the object store while they fit
    `max_bytes`; later epochs then re-read them instead of tokenizing again (Ray Data's
    multi-epoch pattern). Past the budget the blocks are let go and the split streams each
    epoch; with `count` the pass still runs to the end to count the blocks.
    """
    import ray

    # In the pipeline's own order, not as tokenizer actors finish: the cache is the order every
    # epoch's permutation starts from, so it must be the same in every run.
    dataset.context.execution_options.preserve_order = True
    refs: list | None = []
    rows = size = 0
    for bundle in dataset.iter_internal_ref_bundles():
        rows += bundle.num_rows()
        size += bundle.size_bytes()
        if refs is not None and size <= max_bytes:
            refs.extend(bundle.block_refs)
        elif refs is not None:
            refs = None  # over budget: let the blocks go
            if not count:
                break
    if refs is None:
        return TrainingSplit(dataset, rows if count else None, None, (
            f"the tokenized training split passed data.cache_max_bytes ({_mb(max_bytes)}) at "
            f"{_mb(size)}; streaming it each epoch instead (raise data.cache_max_bytes to "
            "tokenize once)"))
    if not refs:
        return TrainingSplit(dataset, 0, None, "the training split is empty")
    return TrainingSplit(ray.data.from_arrow_refs(refs), rows, size, (
        f"{rows:,} training blocks ({_mb(size)}) tokenized once and kept in the object store "
        "for every epoch"), blocks=refs, order_hash=block_order_hash(refs))


def block_order_hash(refs: list) -> str:
    """A short hash of the token ids of cached blocks in their order: two runs that cached the
    same split the same way have the same hash (written to data.json)."""
    import ray

    digest = hashlib.blake2b(digest_size=8)
    for table in ray.get(refs):
        for chunk in table.column("input_ids").chunks:
            digest.update(np.ascontiguousarray(chunk.to_numpy(zero_copy_only=False)).data)
    return digest.hexdigest()


def seeded_rng(seed: int, *keys: int) -> np.random.Generator:
    """A generator drawn from the run's seed and keys (an epoch, a pass, a rank): the same in
    every run, and any int seed works (numpy refuses negative entropy)."""
    return np.random.default_rng([seed % 2**63, *keys])


def block_columns(table: pa.Table) -> dict[str, np.ndarray]:
    """A table of tokenized blocks as [rows, block_size] arrays: views of the object store's
    memory (no copy) where the column is one chunk, as Ray Data's tensor columns are."""
    def array(column) -> np.ndarray:
        parts = [chunk.to_numpy(zero_copy_only=False) for chunk in column.chunks if len(chunk)]
        if not parts:
            return np.zeros((0, 0), np.int32)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    return {name: array(table.column(name)) for name in table.column_names}


CACHE_SHARE = 0.25  # of the object store, for data.cache_max_bytes None: room left for the rest


def cache_budget(cfg: Config, object_store_bytes: float) -> tuple[int, str | None]:
    """(bytes of tokenized training blocks to keep, a warning when the asked budget cannot be
    met by this cluster's object store)."""
    asked = cfg.data.cache_max_bytes
    if asked is None:
        return int(object_store_bytes * CACHE_SHARE), None
    if asked > 0.8 * object_store_bytes:
        return 0, (f"data.cache_max_bytes {_mb(asked)} is more than the object store can hold "
                   f"({_mb(object_store_bytes)}); streaming instead (lower data.cache_max_bytes, "
                   "or give Ray more --object-store-memory)")
    return asked, None


def training_split(cfg: Config, dataset, files: list[str], object_store_bytes: float,
                   world_size: int) -> TrainingSplit:
    """Cache the training blocks when the run will read them more than once and they fit the
    budget; otherwise stream. A run bound by epochs counts its blocks in the same pass."""
    budget, warning = cache_budget(cfg, object_store_bytes)
    count = not cfg.train.max_steps
    if budget and (count or epochs_likely(cfg, files, world_size)):
        split = tokenize_once(dataset, budget, count)
    elif count:  # a counting pass only
        split = tokenize_once(dataset, 0, count)
        split.note = "streaming the training split each epoch (data.cache_max_bytes is 0)"
    else:
        split = TrainingSplit(dataset, None, None, "streaming the training split "
                              "(train.max_steps likely ends the run within one epoch)")
    if warning:
        split.note = warning
    return split


def _mb(size: float) -> str:
    return f"{size / 2**20:,.1f} MiB"


def corpus_sample(cfg: Config, limit: int) -> Iterator[str]:
    """Up to `limit` documents of the training split, streamed (for training a tokenizer)."""
    for batch in read_corpus(cfg, "train").limit(limit).iter_batches(batch_format="pyarrow"):
        for row in batch.to_pylist():
            yield document_text(row, cfg.data)


def check_config(cfg: Config) -> list[str]:
    """Checks that need the filesystem but not Ray; raises ConfigError before Ray starts."""
    try:
        return resolve_files(cfg.data)
    except DataError as exc:
        raise ConfigError(str(exc)) from None


def corpus_statistics(cfg: Config, tokenizer_path: str) -> dict:
    """Run the whole pipeline once, streaming, and return its counts (nothing is kept)."""
    import ray

    stats = create_stats()
    for dataset in build_datasets(cfg, tokenizer_path, stats).values():
        for _ in dataset.iter_batches(batch_size=1024, batch_format="numpy"):
            pass
    totals = ray.get(stats.totals.remote())
    ray.kill(stats)
    return totals


def format_statistics(cfg: Config, totals: dict, files: list[str]) -> str:
    """A small table a user reads before spending a GPU hour on a corpus."""
    def get(name: str, split: str = "") -> int:
        return int(totals.get(f"{name}.{split}" if split else name, 0))

    data = cfg.data
    if data.chat:
        found = ", ".join(f"{name} {get(f'chat_format.{name}'):,}"
                          for name in ("openai", "sharegpt", "alpaca")
                          if get(f"chat_format.{name}"))
        mode = f"conversations ({found or 'none read'}), loss on {data.train_on.replace('_', ' ')}"
    else:
        mode = "prompt/completion" if data.supervised else "causal-LM text"
    mode += ", packed" if data.packing else ""
    lines = [f"corpus      {len(files)} file(s), {data.format}, {mode}, "
             f"block_size {data.block_size}"]
    for split in ("train", "val"):
        tokens, blocks, padding = get("tokens", split), get("blocks", split), get("padding", split)
        slots = blocks * data.block_size
        line = (f"{split:<11} {get('documents', split):,} documents, {tokens:,} tokens, "
                f"{blocks:,} blocks, {_share(padding, slots)} padding")
        other = "unpacked" if data.packing else "packed"
        if totals.get(f"padding_{other}.{split}") is not None:  # examples, not a joined stream
            other_padding = get(f"padding_{other}", split)
            line += f" ({_share(other_padding, other_padding + tokens)} {other})"
        if data.supervised or data.chat:
            target = "reply" if data.chat else "completion"
            line += (f", {get('target_tokens', split):,} {target} tokens, "
                     f"{get('truncated', split):,} {'cut' if data.chat else 'truncated'}")
        lines.append(line)
    skipped = {reason: get(f"skipped.{reason}") for reason in SKIP_REASONS}
    detail = ", ".join(f"{reason} {n:,}" for reason, n in skipped.items() if n) or "none"
    lines.append(f"skipped     {sum(skipped.values()):,} rows ({detail})")
    return "\n".join(lines)


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole if whole else 0:.0f}%"
