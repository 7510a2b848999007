"""The files a run writes, named in this one place: users' run folders, the README and every
command that reads a run (serve, generate, eval, tune) depend on these exact names.

    {run.output_dir}/{run.name}/      a RunFolder (`aigc-ray train`, or `aigc-ray tune`)
        config.yaml                   the resolved config
        metrics.jsonl, samples.jsonl  rank 0's rows per interval, sample replies per evaluation
        workers/rank-N.jsonl          each start of each rank
        data.json                     how the training split was fed; the pipeline's counts
        checkpoint_*/                 Ray Train's checkpoints (CheckpointFolders)
        final/                        the best checkpoint as a plain HF folder (a CheckpointFolder)
        loss_curve.png, eval.json     the curve; final/ against its starting model
        trials/<trial id>/            tune: each trial's own RunFolder
        results.csv, tune_curves.png  tune: a row and a curve per trial
        best/, best_config.yaml       tune: the best trial's model and its config

    a CheckpointFolder: a Hugging Face model folder (config.json, weights, tokenizer) plus
        config.yaml                   the run's config: serve/generate/eval need only the folder
        training_state.pt, adapter/   optimizer, loop state and LoRA adapters (not in final/, best/)
        sharded/                      scaling.strategy fsdp: each rank's shard of the weights and
                                      optimizer state (torch.distributed.checkpoint), in place
                                      of the weights; final/ and best/ are whole HF folders
        eval.json                     what `aigc-ray eval` writes by default
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIG_FILE = "config.yaml"  # ours, in a run folder and beside every checkpoint
EVAL_FILE = "eval.json"
FINAL_DIR = "final"
BEST_DIR = "best"


@dataclass(frozen=True)
class RunFolder:
    """A run's folder and the paths of what `aigc-ray train` and `aigc-ray tune` write there."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def samples(self) -> Path:
        return self.path / "samples.jsonl"

    @property
    def workers(self) -> Path:
        return self.path / "workers"

    def worker_log(self, rank: int) -> Path:
        return self.workers / f"rank-{rank}.jsonl"

    def worker_logs(self) -> list[Path]:
        """Every rank's log, by name."""
        return sorted(self.workers.glob("rank-*.jsonl"))

    @property
    def profile(self) -> Path:  # train.profile_steps: rank-N.trace.json.gz and rank-N.txt
        return self.path / "profile"

    @property
    def data_record(self) -> Path:
        return self.path / "data.json"

    @property
    def final(self) -> Path:
        return self.path / FINAL_DIR

    @property
    def loss_curve(self) -> Path:
        return self.path / "loss_curve.png"

    @property
    def eval_report(self) -> Path:
        return self.path / EVAL_FILE

    # ── a search (`aigc-ray tune`) ──

    @property
    def trials(self) -> Path:
        return self.path / "trials"

    def trial(self, trial_id: str) -> RunFolder:
        return RunFolder(self.trials / trial_id)

    @property
    def results(self) -> Path:
        return self.path / "results.csv"

    @property
    def tune_curves(self) -> Path:
        return self.path / "tune_curves.png"

    @property
    def best(self) -> Path:
        return self.path / BEST_DIR

    @property
    def best_config(self) -> Path:
        return self.path / "best_config.yaml"


@dataclass(frozen=True)
class CheckpointFolder:
    """A model folder (a checkpoint, `final/`, `best/`) and the files aigc-ray keeps in it."""

    path: Path

    @property
    def model_config(self) -> Path:
        """Hugging Face's config.json: present in every loadable model folder."""
        return self.path / "config.json"

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def training_state(self) -> Path:
        return self.path / "training_state.pt"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def sharded(self) -> Path:
        return self.path / "sharded"

    @property
    def eval_report(self) -> Path:
        return self.path / EVAL_FILE
