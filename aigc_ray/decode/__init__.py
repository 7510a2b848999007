"""The decode wing: batched generation in pure PyTorch, shared by serve/ and generate.

    request   the contract between the HTTP side and the engine: GenerationRequest, Chunk,
              TokenLogprob, the request checks (no torch: the ingress imports it)
    sampling  logits → the next token per row: penalties, temperature, top-k/top-p, logprobs
    engine    BatchDecoder: the KV cache, continuous batching, one forward per step
    graphs    SlotDecoder: fixed slots and captured CUDA graphs on a GPU

No Ray here: the serving replica and batch generation drive the engine. The public names are
handed on here, imported when first used, so importing the request types imports no torch.
"""

from __future__ import annotations

from aigc_ray import hand_on

_HOMES = {
    "GenerationRequest": "request", "Chunk": "request", "TokenLogprob": "request",
    "RequestError": "request", "RowFailed": "request", "BatchDecoder": "engine",
    "decode_all": "engine", "new_decoder": "graphs",
}

__all__ = sorted(_HOMES)

__getattr__ = hand_on(__name__, _HOMES)
