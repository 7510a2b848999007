"""Preparing the model on a worker before the first step: which parameters train (frozen
bottom blocks, LoRA adapters), their weight-decay groups, and `torch.compile`.
"""

from __future__ import annotations

from aigc_ray.config import Config
from aigc_ray.errors import UserError


def decay_groups(model, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weight decay on matrices, none on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def transformer_blocks(model, setting: str = "train.freeze_layers=0"):
    """The model's list of transformer blocks, found by shape so any HF causal LM works;
    `setting` is what the error tells a user to set instead."""
    import torch

    depth = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == depth:
            return module
    raise UserError(f"{setting.partition('=')[0]} does not support {type(model).__name__}: its "
                    f"{depth} transformer blocks were not found; set {setting}")


def freeze_bottom(model, num_layers: int) -> None:
    """Freeze the embeddings and the bottom `num_layers` blocks (tied heads freeze with them)."""
    blocks = transformer_blocks(model)
    if num_layers > len(blocks):
        raise UserError(f"train.freeze_layers is {num_layers} but the model has "
                         f"{len(blocks)} blocks")
    frozen = [model.get_input_embeddings(), *list(blocks)[:num_layers]]
    position = getattr(getattr(model, "transformer", None), "wpe", None)  # GPT-2 style
    if position is not None:
        frozen.append(position)
    for module in frozen:
        for param in module.parameters():
            param.requires_grad_(False)


def add_lora(model, cfg: Config, adapter_dir: str | None = None):
    """Wrap the model with trainable LoRA adapters (new, or restored from `adapter_dir`)."""
    try:
        from peft import LoraConfig, PeftModel, get_peft_model
    except ImportError:
        raise UserError("train.lora.enabled needs peft: pip install 'aigc-ray[lora]'") from None
    if adapter_dir:
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    lora = cfg.train.lora
    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha,
                                            lora_dropout=lora.dropout,
                                            target_modules=lora.target_modules,
                                            task_type="CAUSAL_LM"))


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def compiled(model, device) -> tuple[object, str | None]:
    """(`torch.compile`d model, None), or (the model, a warning) where this platform cannot
    compile: tried on a one-line function first, so a missing compiler fails in seconds."""
    import torch

    try:
        probe = torch.compile(lambda x: x * 2 + 1)
        probe(torch.ones(4, device=device))
    except Exception as exc:  # no C++ compiler, no triton, an unsupported Python
        return model, (f"[aigc-ray] warning: train.compile is true but torch.compile fails "
                       f"here ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
                       "training without it")
    return torch.compile(model), None


def mark_length_dynamic(batch: dict) -> None:
    """Tell `torch.compile` that a batch's sequence length varies: unpacked, the feed trims each
    batch to its longest row, so lengths differ from step to step. Marked from the first step,
    the model compiles once; unmarked, it compiles for the first length and again, dynamic, at
    the second. (Packed batches are nearly all full blocks: there a static graph serves them.)"""
    import torch

    for key in ("input_ids", "attention_mask", "labels", "position_ids"):
        if key in batch:
            torch._dynamo.maybe_mark_dynamic(batch[key], 1)
