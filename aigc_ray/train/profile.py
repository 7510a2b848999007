"""`train.profile_steps`: torch.profiler over a window of optimizer steps, on every rank.

What a user asks of a profile first is whether the GPU is kept busy, and if not, where the
time goes. Each rank writes, under the run folder's `profile/`:
- `rank-N.trace.json.gz`: the Chrome/Perfetto trace (open it at https://ui.perfetto.dev);
- `rank-N.txt`: one line with the window's wall time per step and, on a GPU, the share of it
  in which at least one kernel or copy ran (`gpu_busy`), then the ops that took the most time.
The same profiler drives the plain loop in `benchmarks/train_throughput.py --profile`, so ours
and the baseline are read the same way.
"""

from __future__ import annotations

import time
from pathlib import Path

TOP_OPS = 25  # rows of the op table in rank-N.txt


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: time in which at least one ran (kernels
    on different streams overlap, so their durations do not simply add up)."""
    busy, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy


class StepProfiler:
    """Profiles optimizer steps `first` .. `first + count - 1` (1-based, as `metrics.jsonl`
    numbers them). Call `before(done)` and `after(done)` around each step with the number of
    steps done; `close()` at the end writes a window the run cut short. `after` and `close`
    say whether they just wrote the window."""

    def __init__(self, folder: Path, rank: int, device, first: int, count: int):
        self.folder, self.rank, self.device = Path(folder), rank, device
        self.first, self.last = first, first + count - 1
        self.profiler, self.summary = None, None  # summary: the window's line, once written
        self.started, self.window_first = 0.0, first

    def before(self, done: int) -> None:
        if self.profiler is None and self.summary is None and self.first <= done + 1 <= self.last:
            import torch

            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
                torch.cuda.synchronize(self.device)  # the window holds only its own steps
            self.profiler = torch.profiler.profile(activities=activities, record_shapes=True)
            self.profiler.__enter__()
            self.started, self.window_first = time.perf_counter(), done + 1

    def after(self, done: int) -> bool:
        if self.profiler is not None and done >= self.last:
            self._finish(done)
            return True
        return False

    def close(self, done: int) -> bool:
        if self.profiler is not None:
            self._finish(done)
            return True
        return False

    def console_line(self) -> str:
        """Where the profile went, or that the run never reached its window."""
        if self.summary:
            return f"[aigc-ray] profile: {self.summary}; trace and op table in {self.folder}"
        return (f"[aigc-ray] profile: the run ended before train.profile_from={self.first}; "
                "nothing was profiled")

    def _finish(self, done: int) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - self.started
        profiler, self.profiler = self.profiler, None
        profiler.__exit__(None, None, None)
        steps = done - self.window_first + 1
        on_gpu = self.device.type == "cuda"
        line = (f"steps {self.window_first}-{done} on {self.device}: "
                f"{1000 * wall / max(steps, 1):.1f} ms a step")
        try:  # a profile that cannot be read or written must not end the training
            if on_gpu:
                kernels = [(e.time_range.start, e.time_range.end) for e in profiler.events()
                           if e.device_type == torch.autograd.DeviceType.CUDA]
                busy = busy_seconds(kernels) / 1e6  # the profiler's clock is in microseconds
                line += f", gpu_busy {100 * busy / wall:.1f}% (a kernel or copy running)"
            self.folder.mkdir(parents=True, exist_ok=True)
            profiler.export_chrome_trace(str(self.folder / f"rank-{self.rank}.trace.json.gz"))
            table = profiler.key_averages().table(
                sort_by="self_device_time_total" if on_gpu else "self_cpu_time_total",
                row_limit=TOP_OPS)
            (self.folder / f"rank-{self.rank}.txt").write_text(f"{line}\n\n{table}\n")
        except Exception as exc:
            line += f" (not written: {type(exc).__name__}: {exc})"
        self.summary = line
