"""From a step's logits to each row's next token, with each row's own settings.

Per row, a step goes: raw logits → (only when the request asks) EOS masked below `min_tokens`,
`repetition_penalty` (CTRL/Hugging Face: over prompt + generated), `presence_penalty` and
`frequency_penalty` (OpenAI: over the generated tokens) → argmax, or temperature → top-k → top-p
→ sample. Logprobs are `log_softmax` of the raw logits of that same step (before the mask, the
penalties and temperature), as OpenAI reports them and as vLLM does by default
(`logprobs_mode=raw_logprobs`). Rows that ask for none of this cost what they did before.
"""

from __future__ import annotations

import torch

from aigc_ray.decode.request import MIN_TEMPERATURE, GenerationRequest, TokenLogprob


def process_logits(logits: torch.Tensor, request: GenerationRequest, generated: list[int],
                   eos_ids=()) -> torch.Tensor:
    """The scores a row samples from: a float copy of its raw logits with EOS masked below
    `min_tokens` and the penalties applied (vLLM's order; temperature and top-k/top-p follow
    in `sample_batch`)."""
    scores = logits.float().clone()
    if len(generated) < request.min_tokens and not request.ignore_eos and eos_ids:
        scores[list(eos_ids)] = float("-inf")
    if request.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(request.prompt_ids) | set(generated)),
                            device=scores.device)
        picked = scores[seen]
        scores[seen] = torch.where(picked > 0, picked / request.repetition_penalty,
                                   picked * request.repetition_penalty)
    if generated and (request.presence_penalty or request.frequency_penalty):
        ids, counts = torch.tensor(generated, device=scores.device).unique(return_counts=True)
        scores[ids] -= request.frequency_penalty * counts + request.presence_penalty
    return scores


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """`token`'s log-probability under a row's raw logits, and the `top` likeliest tokens'."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    best = []
    if top:
        values, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]))
        best = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logprobs[token]), best)


def prompt_token_logprobs(logits: torch.Tensor, prompt: list[int], top: int
                          ) -> list[TokenLogprob | None]:
    """Each prompt token's logprob given the tokens before it (`logits`: the prompt's positions,
    one row each); the first token has none, as in OpenAI's echo."""
    out: list[TokenLogprob | None] = [None]
    if len(prompt) < 2:
        return out
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
    targets = torch.tensor(prompt[1:], device=logprobs.device)
    chosen = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
    best_values = best_ids = None
    if top:
        best_values, best_ids = torch.topk(logprobs, min(top, logprobs.shape[-1]), dim=-1)
        best_values, best_ids = best_values.tolist(), best_ids.tolist()
    for j, token in enumerate(prompt[1:]):
        best = list(zip(best_ids[j], best_values[j])) if top else []
        out.append(TokenLogprob(token, chosen[j], best))
    return out


# The largest uniform a draw uses: below 1 in float32, so it always falls inside the last bin.
_MAX_UNIFORM = 1 - 2 ** -24


def sample_batch(scores: torch.Tensor, temperature: list[float], top_p: list[float],
                 top_k: list[int], uniform: list[float]) -> torch.Tensor:
    """One token per row of `scores` (rows × vocabulary), each row with its own temperature,
    top-k (0: off), top-p and uniform draw in [0, 1): temperature, then top-k, then nucleus,
    then the token where the row's cumulative probability passes its uniform (inverse-CDF
    sampling). A fixed number of batched operations whatever the batch size, and nothing read
    back: the caller reads every row's token in one go (and checks it: a row whose scores are
    all -inf or hold a NaN draws the id `vocab`, one past the last).

    Each row's maximum is subtracted before dividing by its temperature (at least
    MIN_TEMPERATURE), so the top token's scaled logit is exactly 0 and the rest at most 0: no
    overflow to ±inf, and softmax's sum is at least 1 whatever the temperature."""
    device, vocab = scores.device, scores.shape[-1]
    scores = scores.float()
    temperatures = torch.tensor([max(t, MIN_TEMPERATURE) for t in temperature], device=device)
    logits = (scores - scores.max(dim=-1, keepdim=True).values) / temperatures[:, None]
    nucleus = any(p < 1.0 for p in top_p)
    ranked = nucleus or any(0 < k < vocab for k in top_k)
    order = None
    if ranked:  # likeliest first: top-k is a prefix, top-p a prefix of what is left
        logits, order = logits.sort(dim=-1, descending=True)
        ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=device)
        kth = logits.gather(1, (ks - 1)[:, None])  # ties with the k-th stay in
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if nucleus:  # the smallest prefix whose mass reaches top_p (the top token always stays)
        outside = probs.cumsum(dim=-1) - probs >= torch.tensor(top_p, device=device)[:, None]
        probs = probs.masked_fill(outside, 0.0)
    cdf = probs.cumsum(dim=-1)
    cdf = cdf / cdf[:, -1:]  # ends at exactly 1
    draws = torch.tensor([min(u, _MAX_UNIFORM) for u in uniform], device=device)[:, None]
    picked = torch.searchsorted(cdf, draws, right=True)  # first bin whose cdf passes the draw
    # A NaN cdf passes no draw: searchsorted says `vocab`. That index must not reach `gather`
    # (on a GPU an out-of-range index is a device-side assert that breaks the whole process),
    # so it is clamped there and the row's token set to `vocab` after, for the caller's check.
    past = picked >= vocab
    tokens = order.gather(1, picked.clamp(max=vocab - 1)) if ranked else picked
    return tokens.masked_fill(past, vocab).squeeze(1)
