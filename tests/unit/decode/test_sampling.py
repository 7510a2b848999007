"""Sampling on hand-made logits (aigc_ray/decode/sampling.py), no model: the penalties and
min_tokens as their definitions say, and each row of a batch drawn from its own distribution
(temperature, top-k, top-p)."""

import random

from aigc_ray.decode.request import GenerationRequest


def test_penalties_follow_their_definitions_on_hand_made_logits():
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    from aigc_ray.decode.sampling import process_logits

    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, 0.0, 1.0])
    prompt, generated = [0, 1], [3, 3, 2]

    def scores(**settings):
        request = GenerationRequest(prompt_ids=prompt, max_tokens=8, **settings)
        return process_logits(logits, request, generated, eos_ids={5})

    # OpenAI: presence once per generated token, frequency per occurrence; the prompt is not
    # counted.
    assert scores(presence_penalty=0.5).tolist() == [2.0, -1.0, 0.0, 2.5, 0.0, 1.0]
    assert scores(frequency_penalty=0.25).tolist() == [2.0, -1.0, 0.25, 2.5, 0.0, 1.0]
    assert scores(presence_penalty=-1.0).tolist() == [2.0, -1.0, 1.5, 4.0, 0.0, 1.0]
    # CTRL / Hugging Face: every seen token (prompt + generated), positive divided, negative
    # multiplied; equal to transformers' own processor.
    penalized = scores(repetition_penalty=2.0)
    assert penalized.tolist() == [1.0, -2.0, 0.25, 1.5, 0.0, 1.0]
    reference = RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([prompt + generated]),
                                                      logits.unsqueeze(0))
    assert torch.equal(penalized, reference[0])
    # min_tokens masks EOS while fewer tokens than it were generated, and only then.
    assert scores(min_tokens=4)[5] == float("-inf")
    assert scores(min_tokens=3)[5] == 1.0
    assert scores(min_tokens=4, ignore_eos=True)[5] == 1.0
    assert torch.equal(logits, torch.tensor([2.0, -1.0, 0.5, 3.0, 0.0, 1.0]))  # not in place
    assert not GenerationRequest([1], 4).processed  # plain requests skip all of this


def test_top_k_samples_among_the_k_likeliest_only():
    import torch

    from aigc_ray.decode.sampling import sample_batch

    def sample_next(logits, temperature, top_p, rng, top_k=0):  # one row, one draw
        return int(sample_batch(logits[None], [temperature], [top_p], [top_k], [rng.random()]))

    logits = torch.tensor([0.0, 3.0, 2.9, -1.0, 2.8])
    rng = random.Random(0)
    assert {sample_next(logits, 1.0, 1.0, rng, top_k=1) for _ in range(50)} == {1}
    assert {sample_next(logits, 2.0, 1.0, rng, top_k=2) for _ in range(200)} == {1, 2}
    assert len({sample_next(logits, 2.0, 1.0, rng) for _ in range(200)}) > 2


def test_batched_sampling_draws_each_row_from_its_own_distribution():
    """Evenly spaced draws give each token its probability's share (inverse-CDF sampling):
    temperature, top-k and top-p per row, in one batch, as their definitions say."""
    import torch

    from aigc_ray.decode.sampling import sample_batch

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).log_softmax(-1)
    draws = [(i + 0.5) / 1000 for i in range(1000)]

    def shares(temperature, top_p, top_k):
        rows = logits.expand(len(draws), -1)
        picked = sample_batch(rows, [temperature] * len(draws), [top_p] * len(draws),
                              [top_k] * len(draws), draws)
        return torch.bincount(picked, minlength=4).float() / len(draws)

    def expected(temperature, keep):
        probs = torch.softmax(logits[0] / temperature, -1) * torch.tensor(keep)
        return probs / probs.sum()

    assert torch.allclose(shares(1.0, 1.0, 0), expected(1.0, [1, 1, 1, 1]), atol=2e-3)
    assert torch.allclose(shares(0.5, 1.0, 0), expected(0.5, [1, 1, 1, 1]), atol=2e-3)
    assert torch.allclose(shares(1.0, 1.0, 2), expected(1.0, [1, 1, 0, 0]), atol=2e-3)
    # p(0) = 0.64, p(1) = 0.24: top_p 0.8 keeps both (0.64 < 0.8), 0.6 keeps the first alone.
    assert torch.allclose(shares(1.0, 0.8, 0), expected(1.0, [1, 1, 0, 0]), atol=2e-3)
    assert torch.allclose(shares(1.0, 0.6, 0), expected(1.0, [1, 0, 0, 0]), atol=2e-3)
    # Rows with different settings in one batch: each as if alone; the largest draw stays in.
    mixed = sample_batch(logits.expand(3, -1), [1.0, 1.0, 1.0], [1.0, 0.6, 1.0], [0, 0, 2],
                         [0.999999999, 0.999999999, 0.999999999])
    assert mixed.tolist() == [3, 0, 1]
