"""The training wing: `run_train(cfg)` on the driver, the loop on every Ray Train worker.

    driver    run_train: checks before Ray starts, the data, the TorchTrainer, the export
    loop      the worker: a `TrainingLoop` with setup / train / evaluate / save
    feed      blocks → batches on the device, reshuffled per epoch; the data-wait clock
    prepare   freezing, LoRA adapters, weight-decay groups, torch.compile
    sharding  DDP and FSDP2: wrapping, gradient sync, sharded checkpoints
    loss      the token-mean cross-entropy over the global batch
    export    a trained model as a Hugging Face folder
    metrics   metrics.jsonl, the console lines, the loss curve, MFU
    trackers  TensorBoard, MLflow and W&B
    profile   the torch profiler around chosen steps

The public names are handed on here, imported when first used.
"""

from __future__ import annotations

from aigc_ray import hand_on

_HOMES = {
    "run_train": "driver", "TrainSummary": "driver", "train_loop_per_worker": "loop",
    "export_checkpoint": "export", "export_model": "export",
}

__all__ = sorted(_HOMES)

__getattr__ = hand_on(__name__, _HOMES)
