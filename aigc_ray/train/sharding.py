"""The two data-parallel strategies of `scaling.strategy`, as the training loop uses them.

`ddp`: every worker holds the whole model, its gradients and AdamW's two moments (about 16 bytes
per parameter in fp32); gradients are all-reduced. `fsdp`: PyTorch's FSDP2 (`fully_shard` on each
transformer block, then the root) splits parameters, gradients and optimizer state across the
workers and gathers each block's parameters only while it runs, so every worker holds about 1/N
of that state. Checkpoints of an `fsdp` run are `torch.distributed.checkpoint` folders: each
rank writes and reads its own shard.
"""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path

from aigc_ray.config import Config


def is_sharded(cfg: Config) -> bool:
    return cfg.scaling.strategy == "fsdp"


def shard_model(model, blocks, device, bf16: bool, cpu_offload: bool):
    """FSDP2 in place: each block of `blocks` its own unit, then the root (embeddings, head).
    On a GPU with bf16, parameters are gathered in bf16 and gradients reduced in fp32; with
    `cpu_offload` the shards and the optimizer state live in host memory between uses. The
    model may still be on the CPU: each rank moves only its own shard to `device`."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    options = {"mesh": init_device_mesh(device.type, (world_size,))}
    if bf16 and device.type == "cuda":
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                    reduce_dtype=torch.float32)
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    for block in blocks:
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


@contextlib.contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on the meta device (shapes, no memory) and
    their buffers as usual: buffers are small and many are not in a checkpoint (rotary
    frequencies), so they are computed here as in any model."""
    import torch

    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        # One already on meta is registered as it is: tied weights stay one parameter.
        if param is not None and not param.is_meta:
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def empty_model(path: str, trust_remote_code: bool = False):
    """The causal LM of `path`'s config.json with its parameters on the meta device: what the
    ranks but the first build under fsdp, to receive their shards from rank 0."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with parameters_on_meta():
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def allocate_meta_parameters(model) -> None:
    """Parameters on the meta device become uninitialized host tensors of their shape (tied
    ones stay one tensor): a model a checkpoint fills next, never initialized at random."""
    import torch

    made: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                if id(param) not in made:
                    made[id(param)] = torch.nn.Parameter(torch.empty_like(param, device="cpu"),
                                                         requires_grad=param.requires_grad)
                module._parameters[name] = made[id(param)]


def load_from_rank0(model, full_state: dict | None) -> None:
    """Fill a sharded model from rank 0's whole state dict (`full_state`; None on the other
    ranks, whose parameters are still on the meta device): rank 0 broadcasts each tensor and
    every rank keeps its own shard. A node's host memory then holds one copy of the weights,
    rank 0's, instead of one per rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    set_model_state_dict(model, full_state or {}, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True))
    # Loading assigned each name its own tensor: a tied pair (embeddings and output layer) came
    # apart on the meta ranks. Gathering and resharding sets every module's attributes from
    # FSDP's own parameters again, one per tied pair, before an optimizer sees them.
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.unshard()
            module.reshard()


def reshard(model) -> None:
    """Put every FSDP2 module's parameters back into their shards. A forward without a backward
    (a probe before training) leaves the root's unsharded (FSDP2 keeps the root's gathered from
    forward to backward), and an optimizer made then would hold those gathered tensors instead
    of the model's parameters: its checkpoint then fails (`get_state_dict`: KeyError)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def gradient_sync(step_model, sharded_model, sync: bool, world_size: int):
    """A context for one micro-step of gradient accumulation: gradients are reduced across
    workers only on the last one (`sync`)."""
    if world_size == 1:
        return contextlib.nullcontext()
    if sharded_model is not None:
        sharded_model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync else step_model.no_sync()


def _local_bytes(tensor) -> int:
    """Bytes this rank holds of a tensor (its own shard of a sharded one)."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def state_bytes(model, optimizer) -> dict:
    """What this rank holds of the training state, in bytes: parameters, gradients (call it
    before `zero_grad`) and optimizer state, plus the process's peak memory."""
    import torch

    params = list(model.parameters())
    optimizer_bytes = sum(_local_bytes(value) for state in optimizer.state.values()
                          for value in state.values() if torch.is_tensor(value) and value.ndim)
    row = {"parameter_bytes": sum(_local_bytes(p) for p in params),
           "gradient_bytes": sum(_local_bytes(p.grad) for p in params if p.grad is not None),
           "optimizer_bytes": optimizer_bytes,
           "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
           # Linux reports the resident-set peak in KiB.
           "peak_process_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        row["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return row


def save_sharded(model, optimizer, folder: Path) -> None:
    """This rank's shard of the model and optimizer state into `folder`, a
    torch.distributed.checkpoint folder (a collective: every rank calls it, each writes its
    own file; rank 0 also writes the metadata)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state},
             checkpoint_id=str(folder))


def load_sharded(model, optimizer, folder: Path) -> None:
    """Load this rank's shard of a `save_sharded` folder (resharded if the number of workers
    changed) into the sharded model and its optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])


def load_full_model_state(model, folder: Path) -> None:
    """Fill a plain (unsharded) model with the weights of a `save_sharded` folder, in this one
    process: how `final/` is exported from an fsdp run."""
    import warnings

    import torch.distributed.checkpoint as dcp

    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(folder), no_dist=True)
    model.load_state_dict(state["model"])


def lockstep(batches: list, make_filler, device):
    """Every rank's evaluation must run the same number of forward passes under FSDP (each one
    gathers parameters from all ranks), but validation shards differ in size: yield this rank's
    batches, then filler batches (`make_filler()`, whose results the caller drops) until the
    largest shard is done. Yields (batch, is_real)."""
    import torch
    import torch.distributed as dist

    count = torch.tensor([len(batches)], dtype=torch.int64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
    for index in range(int(count)):
        yield (batches[index], True) if index < len(batches) else (make_filler(), False)
