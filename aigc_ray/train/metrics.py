"""The run folder's record of a training run, and the console lines the driver prints from it.

Rank 0 appends to `metrics.jsonl` and `samples.jsonl`; every rank appends one line to
`workers/rank-N.jsonl` each time it starts. The driver follows these files while the run goes
on, so the console shows one readable line per logging interval from whichever node rank 0 is
on, instead of Ray's forwarded worker output.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from aigc_ray.errors import UserError
from aigc_ray.run_folder import RunFolder
from aigc_ray.train.prepare import transformer_blocks, unwrap

METRIC_KEYS = ("step", "epoch", "loss", "lr", "tokens_per_second", "data_wait", "mfu", "val_loss",
               "val_perplexity")
# Marks the report of a checkpoint saved on a preemption notice (never evaluated).
PREEMPTED_KEY = "preempted"


def read_jsonl(path: Path) -> list[dict]:
    """Every complete JSON line of a file ([] when it does not exist yet)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line still being written, or cut by a killed process
            continue
    return rows


def append_jsonl(path: Path, row: dict) -> None:
    """One line, one write: readers never see half a row from a live writer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def truncate_after(path: Path, step: int) -> None:
    """Drop lines a restarted run will write again (steps past its checkpoint)."""
    rows = [row for row in read_jsonl(path) if row["step"] <= step]
    if path.exists():
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def worker_rows(run_dir: Path) -> list[dict]:
    """Every line of every rank's `workers/rank-N.jsonl`, oldest first."""
    rows = [row for path in RunFolder(run_dir).worker_logs() for row in read_jsonl(path)]
    return sorted(rows, key=lambda row: row["time"])


def worker_starts(run_dir: Path) -> list[dict]:
    """Every start of every rank, oldest first (rank, pid, node_id, device, start_step, ...)."""
    return [row for row in worker_rows(run_dir) if "start_step" in row]


def worker_notes(run_dir: Path) -> list[dict]:
    """Lines rank 0 left for the console (a compile fallback, where a profile went), oldest
    first: workers' own output stays in Ray's logs unless run.ray_logs is on."""
    return [row for row in worker_rows(run_dir) if "note" in row and row["rank"] == 0]


def worker_memory(run_dir: Path) -> list[dict]:
    """What each rank held after its first step of each start, oldest first (parameter_bytes,
    gradient_bytes, optimizer_bytes, peak_process_bytes, ...)."""
    return [row for row in worker_rows(run_dir) if "memory_at_step" in row]


def restart_row(run: RunFolder, step: int, epoch: int, world_size: int,
                global_batch: int) -> dict:
    """The `metrics.jsonl` row of a restart from the checkpoint at `step`: `event` preemption
    (the checkpoint a notice saved, or any after a notice) or restart (a failure, a resize, a
    rerun), and `steps_lost`: the steps trained past the checkpoint, which run again (at least
    those the log saw; 0 when the notice's checkpoint was taken and nothing trained after).
    Call before the log is trimmed to the checkpoint."""
    rank0 = read_jsonl(run.worker_log(0))  # its starts and the notices' checkpoints
    since = max((row["time"] for row in rank0 if "start_step" in row), default=0.0)
    notices = [row["preemption_checkpoint"] for row in rank0
               if "preemption_checkpoint" in row and row["time"] > since]
    reached = max([row["step"] for row in read_jsonl(run.metrics)] + notices + [step])
    return {"step": step, "epoch": epoch, "event": "preemption" if notices else "restart",
            "steps_lost": reached - step, "workers": world_size, "global_batch": global_batch}


def progress_line(row: dict, total_steps: int | None = None) -> str:
    """One readable line per logging interval (step 0: the model before training), or for a
    restart (`restart_row`)."""
    if row.get("event"):
        what = "a preemption" if row["event"] == "preemption" else "a restart"
        return (f"[aigc-ray] {what} handled: step {row['step']} goes on with {row['workers']} "
                f"worker(s), global batch {row['global_batch']}; {row['steps_lost']} step(s) of "
                "training lost")
    if row.get("loss") is None:
        return (f"[aigc-ray] before training | val_loss {row['val_loss']:.4f} | "
                f"val_perplexity {row['val_perplexity']:.2f}")
    of = f"/{total_steps}" if total_steps else ""
    parts = [f"step {row['step']}{of}", f"epoch {row['epoch']}", f"loss {row['loss']:.4f}",
             f"lr {row['lr']:.2e}", f"{row['tokens_per_second']:,.0f} tokens/s"]
    if row.get("mfu") is not None:
        parts.append(f"mfu {100 * row['mfu']:.1f}%")
    if row.get("data_wait") is not None:  # the share of the interval spent waiting for data
        parts.append(f"data_wait {100 * row['data_wait']:.0f}%")
    if row.get("val_loss") is not None:
        parts += [f"val_loss {row['val_loss']:.4f}", f"val_perplexity {row['val_perplexity']:.2f}"]
    return "[aigc-ray] " + " | ".join(parts)


def start_line(row: dict) -> str:
    if row["start_step"] >= row["total_steps"]:
        return (f"[aigc-ray] this run already trained {row['start_step']} steps; exporting its "
                "best checkpoint again (raise train.max_steps to go on, or change run.name)")
    what = f"resuming at step {row['start_step']}" if row["start_step"] else "starting"
    return (f"[aigc-ray] {what}: {row['world_size']} worker(s) on {row['num_nodes']} node(s), "
            f"{row['device']}, {row.get('strategy', 'ddp')}, {row['total_steps']} steps, "
            f"global batch {row['global_batch']} sequences")


class Follower:
    """Prints new lines of a run folder from a background thread until `stop()`."""

    def __init__(self, run_dir: Path, total_steps: int, interval_s: float = 1.0, out=print):
        self.run, self.total_steps, self.interval_s, self.out = (
            RunFolder(run_dir), total_steps, interval_s, out)
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="aigc-ray-follow")

    def __enter__(self) -> Follower:
        self.seen = {self._key("metric", row) for row in read_jsonl(self.run.metrics)}
        self.seen |= {self._key("sample", row) for row in read_jsonl(self.run.samples)}
        self.seen |= {self._key("start", row) for row in worker_starts(self.run.path)}
        self.seen |= {self._key("note", row) for row in worker_notes(self.run.path)}
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()  # what the last interval wrote

    @staticmethod
    def _key(kind: str, row: dict) -> str:
        return kind + json.dumps(row, sort_keys=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def poll(self) -> None:
        events = [(row["start_step"], 0, "start", row) for row in worker_starts(self.run.path)
                  if row["rank"] == 0]
        events += [(row["step"], 1, "metric", row) for row in read_jsonl(self.run.metrics)]
        events += [(row["step"], 2, "sample", row) for row in read_jsonl(self.run.samples)]
        events += [(row["at_step"], 3, "note", row) for row in worker_notes(self.run.path)]
        for _, _, kind, row in sorted(events, key=lambda e: e[:2]):
            key = self._key(kind, row)
            if key in self.seen:
                continue
            self.seen.add(key)
            if kind == "start":
                self.out(start_line(row))
            elif kind == "metric":
                self.out(progress_line(row, self.total_steps))
            elif kind == "note":
                self.out(row["note"])
            else:
                self.out(f"[aigc-ray] sample at step {row['step']} | {row['prompt']!r} → "
                         f"{row['reply']!r}")


def plot_loss_curve(rows: list[dict], out: Path) -> None:
    """Training and validation loss against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(out.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_trial_curves(trial_dirs: dict[str, Path], best: str | None, stopped: set[str],
                      out: Path, exploits: dict[str, list] | None = None) -> None:
    """Validation loss against step for every trial of a search; trials a scheduler stopped
    end in an x, the best trial is drawn bold; where a trial continued from another's
    checkpoint (PBT's `exploits`: trial → [(donor, step)]) a triangle marks its first
    evaluation after that step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for trial, folder in trial_dirs.items():
        points = [(r["step"], r["val_loss"]) for r in read_jsonl(RunFolder(folder).metrics)
                  if r.get("val_loss") is not None]
        if not points:
            continue
        line, = ax.plot(*zip(*points), "-", linewidth=2.5 if trial == best else 1,
                        label=f"{trial}{' (best)' if trial == best else ''}"
                              f"{' (stopped early)' if trial in stopped else ''}")
        if trial in stopped:
            ax.plot(*points[-1], "x", color=line.get_color(), markersize=9)
        for donor, step in (exploits or {}).get(trial, []):
            after = [point for point in points if point[0] > (step or 0)][:1]
            if after:  # the first evaluation of the line it continued
                ax.plot(*after[0], "^", color=line.get_color(), markersize=9)
                ax.annotate(f"from {donor}@{step}", after[0], fontsize=6, xytext=(4, 4),
                            textcoords="offset points")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title(f"{out.parent.name}: validation loss of every trial")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


# ── model FLOPs utilization: the share of the GPU's peak the step used ──
# bf16 dense TFLOPS of one accelerator by the words of its CUDA name; the first match wins.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
               ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
               ("A10", 125.0))


def peak_tflops(device_name: str) -> float | None:
    """The bf16 dense peak of a GPU named like `torch.cuda.get_device_name()`, if known. Names
    match word by word ('NVIDIA A100-SXM4-80GB' is an A100; 'NVIDIA L40' is not an L4)."""
    import re

    words = re.split(r"[^A-Za-z0-9]+", device_name.upper())
    for part, tflops in PEAK_TFLOPS:
        wanted = part.upper().split()
        if any(words[i:i + len(wanted)] == wanted for i in range(len(words))):
            return tflops
    return None


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token that the step actually computes, by the PaLM estimate's terms:

    - forward: 2 per matmul weight, and attention's 4 · width · context in every layer;
    - backward, input gradients: 2 per matmul weight and attention's 8 · width · context, from
      the head down to the lowest block that has something to train (below it nothing needs
      a gradient);
    - backward, weight gradients: 2 per trainable matmul weight.

    Full fine-tuning gives 6N + 12 · layers · width · context; frozen layers and LoRA (whose
    base weights need input gradients but no weight gradients) give less. Embedding lookups
    cost no matmul; a tied output head does, so it counts once."""
    import torch

    config = unwrap(model).config
    embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    head = unwrap(model).get_output_embeddings()
    tied = head is not None and any(head.weight is m.weight for m in embeddings)
    lookups = {id(m.weight) for m in embeddings} - ({id(head.weight)} if tied else set())
    matmul = [p for p in model.parameters() if id(p) not in lookups]  # a tied weight once
    layers = getattr(config, "num_hidden_layers", 0)
    width = getattr(config, "hidden_size", 0)
    try:
        blocks = list(transformer_blocks(model))
    except UserError:  # blocks not found: count a backward through all of them
        blocks = []
    trains = [any(p.requires_grad for p in block.parameters()) for block in blocks]
    below_trains = any(p.requires_grad for m in embeddings for p in m.parameters())
    lowest = 0 if below_trains or not blocks else (trains.index(True) if any(trains)
                                                    else len(blocks))
    skipped = {id(p) for block in blocks[:lowest] for p in block.parameters()}
    if lowest == len(blocks) and blocks and not any(p.requires_grad for p in matmul):
        skipped = {id(p) for p in matmul}  # nothing trains: no backward at all
    backward_params = sum(p.numel() for p in matmul if id(p) not in skipped)
    trainable = sum(p.numel() for p in matmul if p.requires_grad)
    backward_layers = layers - lowest if blocks else layers
    return (2 * sum(p.numel() for p in matmul) + 2 * backward_params + 2 * trainable
            + 4 * layers * width * seq_len + 8 * backward_layers * width * seq_len)
