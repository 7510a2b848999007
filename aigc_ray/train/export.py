"""Exporting a trained model as a plain Hugging Face folder: from the live model on a worker,
or from a checkpoint (sharded or not) in the driver.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from aigc_ray.config import Config
from aigc_ray.run_folder import CheckpointFolder
from aigc_ray.train.prepare import add_lora, unwrap
from aigc_ray.train.sharding import (
    allocate_meta_parameters,
    load_full_model_state,
    parameters_on_meta,
)


def export_model(model, tokenizer, folder: Path) -> None:
    """Save an HF folder (safetensors) that plain transformers loads; LoRA merged in."""
    import copy

    model = unwrap(model)
    if hasattr(model, "merge_and_unload"):  # peft: merge a copy, keep training the adapters
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def export_checkpoint(checkpoint_dir: str, folder: Path) -> None:
    """Copy a training checkpoint as a plain HF folder (no optimizer state, no adapters). The
    shards of an fsdp checkpoint are gathered here, once, into whole weights."""
    if folder.exists():
        shutil.rmtree(folder)
    source = CheckpointFolder(Path(checkpoint_dir))
    shutil.copytree(source.path, folder, ignore=shutil.ignore_patterns(
        source.training_state.name, source.adapter.name, source.sharded.name))
    if source.sharded.is_dir():
        model = gathered_model(source)
        model.save_pretrained(folder, safe_serialization=True)


def gathered_model(checkpoint: CheckpointFolder):
    """The whole model of an fsdp checkpoint, in this process (LoRA merged in): built from the
    checkpoint's own config.json with its parameters on the meta device, given memory without
    a random initialization (which for billions of parameters takes minutes), filled from its
    shards."""
    import yaml
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = Config.model_validate(yaml.safe_load(checkpoint.config.read_text()))
    trust = cfg.model.trust_remote_code
    config = AutoConfig.from_pretrained(checkpoint.path, trust_remote_code=trust)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust,
                                                 dtype=getattr(config, "dtype", None))
    if cfg.train.lora.enabled:
        model = add_lora(model, cfg)
    allocate_meta_parameters(model)
    load_full_model_state(model, checkpoint.sharded)
    return model.merge_and_unload() if cfg.train.lora.enabled else model
