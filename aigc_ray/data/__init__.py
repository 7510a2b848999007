"""The data wing: a corpus read, validated, split, tokenized and packed by Ray Data.

    files     where a corpus lives: paths, globs, URIs, Hugging Face datasets; formats; size
    read      Ray Data read tasks: rows validated where read, train/validation split, skip counts
    chat      conversations: detect the format, render through the chat template, label turns
    pack      tokenizer actors: clean, tokenize, label and pack documents into blocks
    cache     the training split tokenized once and kept in the object store for every epoch
    pipeline  the datasets a config names, and `aigc-ray data`'s checks and statistics
    sample    the sample support corpus (`aigc-ray sample-data`)

The public names are handed on here, imported when first used, so `import aigc_ray.data.chat`
costs no Ray import.
"""

from __future__ import annotations

from aigc_ray import hand_on

_HOMES = {
    "build_datasets": "pipeline", "check_config": "pipeline", "corpus_statistics": "pipeline",
    "format_statistics": "pipeline", "create_stats": "read", "read_corpus": "read",
    "resolve_files": "files", "tokenize": "pack", "training_split": "cache",
    "TrainingSplit": "cache", "write_sample_corpus": "sample",
}

__all__ = sorted(_HOMES)

__getattr__ = hand_on(__name__, _HOMES)
