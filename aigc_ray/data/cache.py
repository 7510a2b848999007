"""The cached training split: blocks tokenized once and held in the object store for every
epoch (Ray's multi-epoch pattern), their order recorded by a hash, and the budget they may use.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from aigc_ray.config import Config
from aigc_ray.data.files import _mb, corpus_bytes


@dataclass
class TrainingSplit:
    """The training blocks as the trainer gets them: cached in the object store or streamed."""

    dataset: object  # a MaterializedDataset when cached, else the lazy pipeline
    rows: int | None  # blocks in the split, when a full pass counted them
    cached_bytes: int | None  # None when streaming
    note: str  # one line for the console: what was decided and why
    blocks: list | None = None  # when cached: the object refs of its tables, in the split's order
    order_hash: str | None = None  # when cached: a hash of its blocks in that order (data.json)


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
