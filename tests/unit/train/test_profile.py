"""`train.profile_steps`: the profiler window, what it writes, and the GPU-busy arithmetic."""

import gzip
import json

import pytest
import torch

from aigc_ray.config import load_config
from aigc_ray.errors import ConfigError
from aigc_ray.run_folder import RunFolder
from aigc_ray.train.profile import StepProfiler, busy_seconds


def test_busy_time_is_the_union_of_overlapping_intervals():
    # Two streams overlap on [1, 2]; [5, 6] stands alone; [5.5, 5.8] lies inside it.
    assert busy_seconds([(1.0, 3.0), (0.0, 2.0), (5.0, 6.0), (5.5, 5.8)]) == pytest.approx(4.0)
    assert busy_seconds([]) == 0.0


def run_steps(profiler: StepProfiler, steps: int) -> int:
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    done = 0
    try:
        for _ in range(steps):
            profiler.before(done)
            model(torch.randn(8, 16)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            done += 1
            profiler.after(done)
    finally:
        profiler.close(done)
    return done


def test_the_window_is_profiled_and_written_as_a_trace_and_a_table(tmp_path):
    folder = RunFolder(tmp_path).profile
    profiler = StepProfiler(folder, 3, torch.device("cpu"), first=2, count=3)
    run_steps(profiler, 6)
    text = (folder / "rank-3.txt").read_text()
    assert text.startswith("steps 2-4 on cpu: ") and " ms a step" in text.splitlines()[0]
    assert profiler.summary == text.splitlines()[0]
    assert "aten::addmm" in text  # the op table, by self CPU time
    with gzip.open(folder / "rank-3.trace.json.gz") as f:
        trace = json.load(f)  # what Perfetto and chrome://tracing open
    names = {event.get("name") for event in trace["traceEvents"]}
    assert "aten::addmm" in names and "Optimizer.step#SGD.step" in names


def test_a_window_the_run_cuts_short_is_still_written_and_one_past_it_is_not(tmp_path):
    cut = StepProfiler(tmp_path / "cut", 0, torch.device("cpu"), first=5, count=10)
    run_steps(cut, 6)
    assert cut.summary.startswith("steps 5-6 on cpu")
    never = StepProfiler(tmp_path / "never", 0, torch.device("cpu"), first=9, count=2)
    run_steps(never, 6)
    assert never.summary is None and not (tmp_path / "never").exists()
    assert never.console_line().endswith("train.profile_from=9; nothing was profiled")


def test_a_window_past_max_steps_fails_before_ray_starts():
    with pytest.raises(ConfigError, match="train.profile_from=50 is past train.max_steps=10"):
        load_config("tiny_cpu", ["train.profile_steps=2", "train.profile_from=50",
                                 "train.max_steps=10"])


def test_a_profile_that_cannot_be_written_says_so_and_the_steps_go_on(tmp_path):
    (tmp_path / "taken").write_text("a file where the profile folder would go")
    profiler = StepProfiler(tmp_path / "taken", 0, torch.device("cpu"), first=1, count=2)
    assert run_steps(profiler, 4) == 4  # all four steps ran
    assert profiler.summary.startswith("steps 1-2 on cpu: ")
    assert "(not written: FileExistsError" in profiler.summary
