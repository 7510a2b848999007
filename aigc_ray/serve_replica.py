"""The model deployment: one replica holds the model and decodes concurrent requests in batches.

`serve.batch` gathers requests that arrive within `serve.batch_wait_timeout_s` (up to
`serve.max_batch_size`) into one `BatchDecoder`; each decode step runs in a worker thread so
the replica keeps accepting requests (and the next batch keeps filling) while the model runs.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

from ray import serve

from aigc_ray.serve_decode import BatchDecoder, Chunk, GenerationRequest

# A decode step that has not finished in this long means the replica is wedged, not busy.
STALL_S = 120.0


def resolve_device(device: str) -> str:
    """`auto` → cuda when a GPU is visible, else cpu."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str):
    """`auto` → bfloat16 on GPUs that have it (else float16), float32 on CPU."""
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantize_int8(model):
    """Dynamic int8 quantization of every linear layer (CPU only).

    GPT-2 style models use transformers' `Conv1D` (a linear layer with its weight transposed),
    which torch's quantizer does not know: those become `nn.Linear` first.
    """
    import torch
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                linear = nn.Linear(child.weight.shape[0], child.weight.shape[1])
                linear.weight.data = child.weight.data.t().contiguous()
                linear.bias.data = child.bias.data
                setattr(parent, name, linear)
    return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def load_for_serving(checkpoint: str, device: str, dtype: str, quantize: str,
                     trust_remote_code: bool = False):
    """(model in eval mode on its device, tokenizer) for a HF causal-LM folder."""
    from aigc_ray.model import load_model, load_tokenizer

    device = resolve_device(device)
    model = load_model(checkpoint, trust_remote_code, dtype=resolve_dtype(dtype, device))
    model = model.to(device).eval()
    if quantize == "int8":
        model = quantize_int8(model)
    return model, load_tokenizer(checkpoint, trust_remote_code)


def _metrics():
    from ray.serve.metrics import Counter, Histogram

    return {
        "ttft": Histogram(
            "aigc_ray_time_to_first_token_seconds",
            description="Seconds from the ingress receiving a request to its first token.",
            boundaries=[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]),
        "tpot": Histogram(
            "aigc_ray_time_per_output_token_seconds",
            description="Seconds per generated token after the first, per request.",
            boundaries=[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1]),
        "tokens": Counter("aigc_ray_tokens_generated",
                          description="Completion tokens generated."),
        "batch_size": Histogram(
            "aigc_ray_batch_size", description="Requests decoded together in one batch.",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128]),
    }


@serve.deployment(name="Generator")
class Generator:
    """Holds the model; `complete` and `stream` go through the shared batch loop."""

    def __init__(self, checkpoint: str, serve_config: dict, trust_remote_code: bool = False):
        import torch

        from aigc_ray.config import Serve

        cfg = Serve.model_validate(serve_config)
        # Ray gives the replica `cpus_per_replica` logical CPUs; more torch threads than that
        # only fight the other replicas on the same node.
        torch.set_num_threads(max(1, int(cfg.cpus_per_replica)))
        self.model, self.tokenizer = load_for_serving(
            checkpoint, cfg.device, cfg.dtype, cfg.quantize, trust_remote_code)
        self._decode_batch.set_max_batch_size(cfg.max_batch_size)
        self._decode_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self.metrics = _metrics()
        self.step_started: float | None = None  # monotonic time of the step now running
        self._probe()  # a replica that cannot run its model must fail here, not on traffic

    async def complete(self, request: GenerationRequest) -> dict:
        """The whole completion: text, token_ids, finish_reason and token counts."""
        result = {"text": "", "token_ids": [], "finish_reason": None,
                  "prompt_tokens": len(request.prompt_ids), "completion_tokens": 0}
        async for chunk in self._decode_batch(request):
            result["text"] += chunk.text
            result["token_ids"] += chunk.token_ids
            result["finish_reason"] = chunk.finish_reason
            result["completion_tokens"] = chunk.completion_tokens
        return result

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """The completion step by step; steps that produced no visible text are skipped."""
        async for chunk in self._decode_batch(request):
            if chunk.text or chunk.finish_reason:
                yield chunk

    async def ready(self) -> dict:
        """Generate one token through the batch loop: proof this replica serves requests."""
        probe = GenerationRequest(prompt_ids=[self._probe_token()], max_tokens=1, temperature=0)
        result = await self.complete(probe)
        return {"pid": os.getpid(), "generated": result["completion_tokens"]}

    def pid(self) -> int:
        """The replica's process id (tests kill replicas by pid)."""
        return os.getpid()

    async def check_health(self) -> None:
        """Serve's replica health check: the model still computes, and no step is stuck."""
        if self.step_started is not None and time.monotonic() - self.step_started > STALL_S:
            raise RuntimeError(f"a decode step has run for more than {STALL_S:.0f} s")
        await asyncio.to_thread(self._probe)

    def _probe_token(self) -> int:
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id or 0

    def _probe(self) -> None:
        import torch

        with torch.inference_mode():
            ids = torch.tensor([[self._probe_token()]], device=self.model.device)
            logits = self.model(input_ids=ids).logits
        if not torch.isfinite(logits).all():
            raise RuntimeError("the model produced non-finite logits")

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)  # replaced from config in __init__
    async def _decode_batch(self, requests: list[GenerationRequest]):
        decoder = BatchDecoder(self.model, self.tokenizer, requests)
        self.metrics["batch_size"].observe(len(requests))
        first_token_at: list[float | None] = [None] * len(requests)
        finished = [False] * len(requests)
        while not decoder.done:
            self.step_started = time.monotonic()
            try:
                chunks = await asyncio.to_thread(decoder.step)
            finally:
                self.step_started = None
            now = time.time()
            out = []
            for index, chunk in enumerate(chunks):
                if chunk is None:  # finished in an earlier step: its caller is already done
                    out.append(StopIteration)
                    continue
                self._record(requests[index], chunk, first_token_at, index, now)
                finished[index] = chunk.finish_reason is not None
                out.append(chunk)
            yield out

    def _record(self, request: GenerationRequest, chunk: Chunk, first_token_at: list,
                index: int, now: float) -> None:
        if chunk.token_ids:
            self.metrics["tokens"].inc(len(chunk.token_ids))
        if first_token_at[index] is None:
            first_token_at[index] = now
            self.metrics["ttft"].observe(max(0.0, now - request.arrival_time))
        if chunk.finish_reason is not None and chunk.completion_tokens > 1:
            per_token = (now - first_token_at[index]) / (chunk.completion_tokens - 1)
            self.metrics["tpot"].observe(per_token)
