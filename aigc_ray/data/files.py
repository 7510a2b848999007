"""Where a corpus lives: local paths, globs, s3:// / gs:// URIs and Hugging Face datasets
resolved to the files to read, each file's format, and the corpus size on disk.
"""

from __future__ import annotations

import glob
from pathlib import Path

from aigc_ray.config import Data
from aigc_ray.errors import DataError

GLOB_CHARS = set("*?[")


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


def corpus_bytes(files: list[str]) -> int | None:
    """Bytes of the corpus files, or None when a size cannot be read cheaply (object stores)."""
    import os

    try:
        return sum(os.path.getsize(path) for path in files)
    except OSError:
        return None


def _mb(size: float) -> str:
    return f"{size / 2**20:,.1f} MiB"
