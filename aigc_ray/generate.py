"""Batch generation: prompts in files → Ray Data → a pool of model actors → completions in files.

Read tasks stream the input (jsonl, parquet or text; local paths or object-store URIs) and check
each row where it is read: a row with no usable prompt is skipped, counted and listed, never
fatal unless `generate.strict` is set. `Completer` actors each hold the model and decode a batch
of prompts together with the same batched decoder the serving replicas use (left padding, KV
cache, per-row stop strings and seeds), so a temperature-0 completion is what `model.generate`
gives for that prompt alone. Ray Data writes the rows as they come (parquet or JSONL).

A prompt that is a list of messages ({"role", "content"}, as the chat API takes) is rendered
by the model's chat template with `chat.chat_ids`, exactly as training and the chat endpoint
render it; its output row's `prompt` holds the messages as JSON.

Every output row carries its input id, so output rows plus skipped rows equal input rows.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from aigc_ray.checkpoint import checkpoint_config
from aigc_ray.config import Config, Data, Generate
from aigc_ray.data.chat import chat_ids, messages_of
from aigc_ray.data.files import format_of, resolve_files
from aigc_ray.data.pipeline import pipeline_cpus
from aigc_ray.data.read import (
    ROWS_PER_BLOCK,
    SKIP_REASONS,
    create_stats,
    field_text,
    iter_records,
    ray_get,
    stream_datasource,
)
from aigc_ray.errors import ConfigError, DataError
from aigc_ray.tokenizer import clean, context_length

SUMMARY_FILE = "_summary.json"  # a leading "_": parquet and Ray Data readers skip it
SKIPPED_FILE = "_skipped.jsonl"
GENERATE_KEYS = ("generate", "model.trust_remote_code")
CHAT_COLUMN = "_chat"  # true where the prompt is a conversation (messages as JSON)
MAX_LISTED_SKIPS = 10_000  # rows named in _skipped.jsonl per run; the counts are always whole


def load_generate_config(checkpoint: str, overrides: list[str] | None = None
                         ) -> tuple[Path, Config]:
    """(model folder, Config) for batch generation: the folder's config.yaml generate section
    (if any), then `generate.key=value` overrides. Raises a one-line ConfigError."""
    return checkpoint_config(checkpoint, overrides, GENERATE_KEYS, "generate")


def input_format(files: list[str], chosen: str) -> str:
    """`generate.input_format`, or for `auto` the format the first file's extension names."""
    if chosen != "auto":
        return chosen
    fmt = format_of(files[0])
    if fmt is None:
        raise ConfigError(f"cannot tell the format of {files[0]} from its extension; set "
                          "generate.input_format to jsonl, parquet or text")
    return fmt


def row_seed(seed: int, row_id: str) -> int:
    """A row's sampling seed: the same for the same id however the rows are batched."""
    digest = hashlib.blake2b(f"{seed}:{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


# ── 1. Read prompts ──────────────────────────────────────────────────────────────────────────


def read_prompts(f, path: str, data: Data, gen: Generate, stats) -> Iterator[pa.Table]:
    """Blocks of {id, prompt} from one file; bad rows are counted and listed in `stats`."""
    rows: list[dict] = []
    counts: Counter = Counter()
    skipped: list[dict] = []
    first = 1
    name = Path(path).name
    for number, record in iter_records(f, data):
        counts["rows"] += 1
        prompt = record if isinstance(record, str) else field_text(record, gen.prompt_field)
        chat = isinstance(record, dict) and isinstance(record.get(gen.prompt_field), list)
        if chat:
            messages = messages_of(record[gen.prompt_field])
            prompt = messages if isinstance(messages, str) else json.dumps(messages,
                                                                           ensure_ascii=False)
        row_id = f"{name}:{number}"
        if isinstance(record, dict) and record.get(gen.id_field) is not None:
            row_id = str(record[gen.id_field])
        if prompt in SKIP_REASONS:
            if gen.strict:
                raise DataError(f"{path} line {number}: {prompt.replace('_', ' ')} (field "
                                f"{gen.prompt_field!r}; generate.strict is true: set it false "
                                "to skip and count bad rows)")
            counts[f"skipped.{prompt}"] += 1
            if len(skipped) < MAX_LISTED_SKIPS:
                skipped.append({"id": row_id, "file": path, "line": number, "reason": prompt})
        else:
            rows.append({"id": row_id, "prompt": prompt, CHAT_COLUMN: chat})
        if len(rows) >= ROWS_PER_BLOCK:
            yield from _prompt_block(rows, counts, skipped, stats, f"read:{path}:{first}")
            rows, counts, skipped, first = [], Counter(), [], number + 1
    yield from _prompt_block(rows, counts, skipped, stats, f"read:{path}:{first}")


def _prompt_block(rows, counts, skipped, stats, key) -> Iterator[pa.Table]:
    """The block of prompts read so far (none when every row was skipped), once its counts and
    skipped rows are recorded in `stats` under `key`."""
    if counts:
        ray_get(stats.record.remote(key, dict(counts), skipped))
    if rows:
        yield pa.table({name: [r[name] for r in rows] for name in ("id", "prompt", CHAT_COLUMN)})


def prompts_dataset(files: list[str], cfg: Config, stats):
    """The input rows as a Ray Data Dataset of {id, prompt}."""
    import ray

    gen = cfg.generate
    fmt = input_format(files, gen.input_format)
    data = Data(path=files, format=fmt, text_field=gen.prompt_field)

    def read_stream(f, path: str) -> Iterator[pa.Table]:
        return read_prompts(f, path, data, gen, stats)

    return ray.data.read_datasource(stream_datasource(files, fmt == "parquet", read_stream),
                                    num_cpus=cfg.data.cpus_per_task)


# ── 2. Generate ──────────────────────────────────────────────────────────────────────────────


class Completer:
    """Ray Data callable class: each actor loads the model once, then completes batches.

    Output rows: id, prompt, completion, prompt_tokens, completion_tokens, finish_reason ("stop":
    EOS or a stop string; "length": max_tokens or the model's context), plus the input columns
    `keep` names ({output name: input column}).
    A prompt that alone fills the model's context is skipped and counted as prompt_too_long.
    """

    def __init__(self, checkpoint: str, generate: dict, trust_remote_code: bool = False,
                 stats=None, prompt_column: str = "prompt", id_column: str = "id",
                 keep: dict[str, str] | None = None):
        from aigc_ray.decode.graphs import static_step_for
        from aigc_ray.model import load_for_inference

        self.gen = Generate.model_validate(generate)
        self.model, self.tokenizer = load_for_inference(
            checkpoint, self.gen.device, self.gen.dtype, trust_remote_code=trust_remote_code,
            threads=self.gen.cpus_per_actor)
        self.context = context_length(self.model.config, self.tokenizer)  # None: no limit
        self.step, note = static_step_for(self.model, self.tokenizer, self.gen.batch_size,
                                          self.gen.cuda_graphs)
        if note:
            print(f"[aigc-ray] generate: {note}", flush=True)
        self.stats = stats
        self.prompt_column, self.id_column, self.keep = prompt_column, id_column, keep or {}

    def __call__(self, batch: dict) -> dict:
        from aigc_ray.decode.engine import decode_all
        from aigc_ray.decode.graphs import new_decoder
        from aigc_ray.decode.request import GenerationRequest

        gen = self.gen
        prompts = [str(p) for p in batch[self.prompt_column]]
        ids = [str(i) for i in batch[self.id_column]]
        encoded = self._encode(prompts, batch.get(CHAT_COLUMN))
        requests, rows, skipped = [], [], []
        for index, (row_id, prompt_ids) in enumerate(zip(ids, encoded)):
            if isinstance(prompt_ids, str):
                skipped.append({"id": row_id, "reason": prompt_ids})
                continue
            room = gen.max_tokens if self.context is None else min(
                gen.max_tokens, self.context - len(prompt_ids))
            if room < 1 or not prompt_ids:
                skipped.append({"id": row_id, "reason": "prompt_too_long" if prompt_ids
                                else "empty_text"})
                continue
            rows.append(index)
            requests.append(GenerationRequest(
                prompt_ids=prompt_ids, max_tokens=room, temperature=gen.temperature,
                top_p=gen.top_p, stop=list(gen.stop), seed=row_seed(gen.seed, row_id),
                top_k=gen.top_k, presence_penalty=gen.presence_penalty,
                frequency_penalty=gen.frequency_penalty,
                repetition_penalty=gen.repetition_penalty,
                min_tokens=min(gen.min_tokens, room), ignore_eos=gen.ignore_eos))
        decoder = new_decoder(self.model, self.tokenizer, self.step, max_rows=gen.batch_size)
        started = time.perf_counter()
        results = decode_all(self.model, self.tokenizer, requests, decoder) if requests else []
        decode_seconds = time.perf_counter() - started
        if self.stats is not None:
            counts = Counter(f"skipped.{s['reason']}" for s in skipped)
            counts["generated"] = len(rows)
            counts["completion_tokens"] = sum(len(r["token_ids"]) for r in results)
            counts["decode_seconds"] = decode_seconds
            ray_get(self.stats.record.remote(f"generate:{ids[0]}:{len(ids)}", dict(counts),
                                             skipped))
        out = {
            "id": np.array([ids[i] for i in rows], dtype=object),
            "prompt": np.array([prompts[i] for i in rows], dtype=object),
            "completion": np.array([r["text"] for r in results], dtype=object),
            "prompt_tokens": np.array([len(encoded[i]) for i in rows], dtype=np.int64),
            "completion_tokens": np.array([len(r["token_ids"]) for r in results],
                                          dtype=np.int64),
            "finish_reason": np.array([r["finish_reason"] for r in results], dtype=object),
        }
        for name, column in self.keep.items():
            out[name] = np.array([batch[column][i] for i in rows], dtype=object)
        return out

    def _encode(self, prompts: list[str], chats) -> list:
        """Token ids of each prompt (a conversation through the chat template), or a skip
        reason for a conversation the model has no chat template for."""
        encoded: list = [None] * len(prompts)
        plain = [i for i in range(len(prompts)) if chats is None or not chats[i]]
        if plain:
            texts = [clean(prompts[i]) for i in plain]
            for i, ids in zip(plain, self.tokenizer(texts, verbose=False)["input_ids"]):
                encoded[i] = ids
        for i in sorted(set(range(len(prompts))) - set(plain)):
            encoded[i] = (chat_ids(self.tokenizer, json.loads(prompts[i]), True)
                          if self.tokenizer.chat_template else "no_chat_template")
        return encoded


def use_gpu(gen: Generate) -> bool:
    """Whether model actors take GPUs: `cuda`, or `auto` on a cluster that has GPUs."""
    import ray

    return gen.device == "cuda" or (gen.device == "auto"
                                    and ray.cluster_resources().get("GPU", 0) > 0)


# With CUDA graphs on a GPU an actor is handed this many decode batches of prompts per call and
# keeps `generate.batch_size` rows decoding, starting a waiting prompt as a row finishes: a GPU
# step costs about the same for any rows up to the batch, so a full batch is free tokens. Not on
# CPU, where a step costs in proportion to its rows and each join a prefill of its own: refilled
# rows measured 0.81x of batches run to their end there (benchmarks/decode_engine.py --refill).
REFILL_BATCHES = 4


def prompts_per_call(gen: Generate, gpu: bool) -> int:
    """Prompts Ray Data hands a model actor at a time (see REFILL_BATCHES)."""
    return gen.batch_size * (REFILL_BATCHES if gpu and gen.cuda_graphs else 1)


def complete(dataset, checkpoint: str, cfg: Config, stats=None, prompt_column: str = "prompt",
             id_column: str = "id", keep: dict[str, str] | None = None,
             generate: Generate | None = None):
    """`dataset` → completions, by a pool of `generate.concurrency` model actors."""
    gen = generate or cfg.generate
    import ray

    gpu = use_gpu(gen)
    return dataset.map_batches(
        Completer,
        fn_constructor_kwargs={"checkpoint": str(checkpoint), "generate": gen.model_dump(),
                               "trust_remote_code": cfg.model.trust_remote_code, "stats": stats,
                               "prompt_column": prompt_column, "id_column": id_column,
                               "keep": keep},
        batch_size=prompts_per_call(gen, gpu),
        compute=ray.data.ActorPoolStrategy(size=gen.concurrency),
        num_cpus=gen.cpus_per_actor,
        num_gpus=gen.gpus_per_actor if gpu else None,
        batch_format="numpy",
    )


# ── 3. The command ───────────────────────────────────────────────────────────────────────────


@dataclass
class GenerateSummary:
    output: str
    input_rows: int
    written_rows: int
    skipped: dict  # reason → rows
    completion_tokens: int
    seconds: float
    files: int
    decode_seconds: float = 0.0  # summed over model actors: time inside the decode engine

    def line(self) -> str:
        rate = self.written_rows / self.seconds if self.seconds else 0.0
        skipped = sum(self.skipped.values())
        detail = ", ".join(f"{reason} {n:,}" for reason, n in sorted(self.skipped.items()))
        files = f" in {self.files} file(s)" if self.files else ""
        line = (f"wrote {self.written_rows:,} completions ({self.completion_tokens:,} tokens) to "
                f"{self.output}{files}; {self.input_rows:,} input rows, {skipped:,} skipped")
        if skipped:
            line += f" ({detail}; listed in {SKIPPED_FILE})"
        line += f"; {rate:.1f} completions/s over {self.seconds:.1f} s"
        if self.decode_seconds:
            line += (f" ({self.completion_tokens / self.decode_seconds:,.0f} tokens/s per actor "
                     "while decoding)")
        return line


def check_generate(input_path: str, output: str, cfg: Config) -> list[str]:
    """Checks that need no Ray: the input exists and has a known format, the output is new."""
    try:
        files = resolve_files(Data(path=input_path, format="text"))
    except DataError as exc:
        raise ConfigError(str(exc).replace("data.path", "--input")) from None
    input_format(files, cfg.generate.input_format)
    if "://" not in output:
        out = Path(output).expanduser()
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ConfigError(f"--output {output} already exists and is not empty; name a new "
                              "folder (generate never overwrites results)")
    return files


def cpu_shortage_warning(cfg: Config, cluster: dict) -> str | None:
    """A warning when the model actors leave no CPU for reading and writing: the pipeline
    then stalls until an autoscaler adds a node, which on a fixed cluster means forever."""
    gen = cfg.generate
    need = (gen.concurrency * gen.cpus_per_actor
            + pipeline_cpus(cfg.data, tokenizing=False, writing=True))
    have = cluster.get("CPU", 0)
    if need <= have:
        return None
    return (f"[aigc-ray] warning: generate.concurrency {gen.concurrency} × "
            f"generate.cpus_per_actor {gen.cpus_per_actor:g} plus reading and writing "
            f"(2 × data.cpus_per_task {cfg.data.cpus_per_task:g}) need {need:g} CPUs; the "
            f"cluster has {have:g} now. Generation waits for an autoscaler to add them; on a "
            "fixed cluster lower generate.concurrency or generate.cpus_per_actor (e.g. 0.75)")


def count_input_rows(files: list[str], fmt: str) -> int | None:
    """Rows in local input files (lines, or parquet metadata), for the progress line's total;
    None for object-store URIs, which would have to be read twice to count."""
    if any("://" in f and not f.startswith("file://") for f in files):
        return None
    total = 0
    for name in files:
        local = name.removeprefix("file://")
        if fmt == "parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(local).metadata.num_rows
            continue
        with open(local, "rb") as f:
            newlines, last = 0, b"\n"
            while chunk := f.read(1 << 20):
                newlines += chunk.count(b"\n")
                last = chunk[-1:]
            total += newlines + (last != b"\n")
    return total


class Progress:
    """Prints `[aigc-ray] generated N/TOTAL rows ...` every `interval_s` from a thread."""

    def __init__(self, stats, total: int | None, interval_s: float = 10.0, out=None):
        import threading

        self.stats, self.total, self.interval_s = stats, total, interval_s
        self.out = out or (lambda line: print(line, flush=True))
        self.started = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="aigc-ray-progress")

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            totals = ray_get(self.stats.totals.remote())
            self.out(generation_progress_line(totals, self.total,
                                              time.perf_counter() - self.started))


def generation_progress_line(totals: dict, total: int | None, seconds: float) -> str:
    """`Progress`'s line: rows generated (of the input's total when known), skipped, rate."""
    done = int(totals.get("generated", 0))
    skipped = sum(int(n) for key, n in totals.items() if key.startswith("skipped."))
    rate = done / seconds if seconds else 0.0
    line = f"[aigc-ray] generated {done:,}"
    if total:
        finished = done + skipped
        line += f"/{total:,} rows ({100 * finished / total:.0f}%"
        if rate > 0 and finished < total:
            line += f", about {(total - finished) / rate:.0f} s left"
        line += ")"
    else:
        line += " rows"
    return line + f" | {skipped:,} skipped | {rate:.1f} completions/s"


def _write_text(uri_or_path: str, text: str) -> None:
    from pyarrow import fs as pafs

    filesystem, path = pafs.FileSystem.from_uri(uri_or_path) if "://" in uri_or_path else (
        pafs.LocalFileSystem(), str(Path(uri_or_path).resolve()))
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)  # no rows: no folder yet
    with filesystem.open_output_stream(path) as f:
        f.write(text.encode("utf-8"))


def run_generate(checkpoint: str, input_path: str, output: str, cfg: Config,
                 files: list[str] | None = None) -> GenerateSummary:
    """Generate a completion for every good input row and write them to `output`."""
    import ray

    from aigc_ray.cluster import start_ray

    files = files or check_generate(input_path, output, cfg)
    start_ray(ray_logs=cfg.run.ray_logs)
    warning = cpu_shortage_warning(cfg, ray.cluster_resources())
    if warning:
        print(warning, flush=True)
    started = time.perf_counter()
    stats = create_stats()
    total = count_input_rows(files, input_format(files, cfg.generate.input_format))
    try:
        completions = complete(prompts_dataset(files, cfg, stats), checkpoint, cfg, stats)
        out = output if "://" in output else str(Path(output).expanduser().resolve())
        # Writing is light: a fraction of a CPU, like reading, leaves whole CPUs to the models.
        write_args = {"ray_remote_args": {"num_cpus": cfg.data.cpus_per_task}}
        with Progress(stats, total):
            if cfg.generate.output_format == "parquet":
                completions.write_parquet(out, **write_args)
            else:  # JSON Lines, named so (Ray Data's own names end in .json)
                from ray.data.datasource import FilenameProvider

                completions.write_json(out, filename_provider=FilenameProvider(
                    file_format="jsonl"), **write_args)
        totals = ray.get(stats.totals.remote())
        skipped_rows = ray.get(stats.details.remote())
    finally:
        ray.kill(stats)
    seconds = time.perf_counter() - started
    skipped = {key.split(".", 1)[1]: int(n) for key, n in totals.items()
               if key.startswith("skipped.")}
    summary = GenerateSummary(
        output=out, input_rows=int(totals.get("rows", 0)),
        written_rows=int(totals.get("generated", 0)), skipped=skipped,
        completion_tokens=int(totals.get("completion_tokens", 0)), seconds=seconds,
        files=_count_files(out), decode_seconds=float(totals.get("decode_seconds", 0.0)))
    _write_text(f"{out.rstrip('/')}/{SUMMARY_FILE}", json.dumps({
        "checkpoint": str(checkpoint), "input": input_path, "input_rows": summary.input_rows,
        "written_rows": summary.written_rows, "skipped": skipped,
        "completion_tokens": summary.completion_tokens, "seconds": round(seconds, 3),
        "decode_seconds": round(summary.decode_seconds, 3),
        "generate": cfg.generate.model_dump()}, indent=2) + "\n")
    if skipped_rows:
        _write_text(f"{out.rstrip('/')}/{SKIPPED_FILE}",
                    "".join(json.dumps(row) + "\n" for row in skipped_rows))
    return summary


def _count_files(out: str) -> int:
    if "://" in out:
        return 0
    return sum(1 for p in Path(out).iterdir() if not p.name.startswith(("_", ".")))
