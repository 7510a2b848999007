"""serve.quantize=int8 through torchao: no deprecation warnings, output close to float32, and a
one-line error naming the extra when torchao is missing (all without Ray)."""

import sys
import warnings

import pytest
import torch

from aigc_ray.decode import GenerationRequest, decode_all
from aigc_ray.errors import ConfigError
from aigc_ray.model import load_for_inference, quantize_int8
from aigc_ray.serve import load_serve_config

PROMPTS = ["Customer: I want a refund for my Orbit Watch.\nAgent:", "Hi",
           "Customer: How do I reset my password for Nimbus Drive? It keeps failing.\nAgent:"]


@pytest.fixture(scope="module")
def int8_model(tiny_model_dir):
    """(int8 model, the Python warnings its loading raised)."""
    pytest.importorskip("torchao")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = load_for_inference(tiny_model_dir, "cpu", "float32", "int8")
    return model, caught


def test_int8_loads_without_deprecation_warnings(int8_model):
    from torchao.quantization import Int8Tensor
    from transformers.pytorch_utils import Conv1D

    model, caught = int8_model
    deprecations = [f"{w.category.__name__}: {w.message}" for w in caught
                    if issubclass(w.category, (DeprecationWarning, FutureWarning))
                    or "deprecated" in str(w.message)]
    assert not deprecations
    assert not any(isinstance(m, Conv1D) for m in model.modules())  # GPT-2's became nn.Linear
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m.weight, Int8Tensor) for m in linears)
    assert not any(type(m).__module__.startswith("torch.ao") for m in model.modules())


def test_int8_greedy_output_stays_close_to_float32(int8_model, tiny_model_dir):
    quantized, _ = int8_model
    model, tokenizer = load_for_inference(tiny_model_dir, "cpu", "float32", "none")
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    with torch.inference_mode():
        for row in ids:
            full = model(torch.tensor([row])).logits
            int8 = quantized(torch.tensor([row])).logits
            assert ((int8 - full).norm() / full.norm()).item() < 0.05  # ~0.012 measured

    def greedy(m):
        return [r["token_ids"] for r in decode_all(m, tokenizer, [
            GenerationRequest(prompt_ids=row, max_tokens=12, temperature=0) for row in ids])]

    expected, got = greedy(model), greedy(quantized)
    same = sum(a == b for e, g in zip(expected, got) for a, b in zip(e, g))
    assert same >= 0.9 * sum(len(e) for e in expected)  # all equal here; rounding may flip a tie


def test_int8_without_torchao_fails_with_one_line_naming_the_extra(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao → ImportError
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(ConfigError) as before_ray:  # what `aigc-ray serve` checks before Ray
        load_serve_config(tiny_model_dir, ["serve.quantize=int8", "serve.device=cpu"])
    assert "pip install 'aigc-ray[int8]'" in str(before_ray.value)
    assert "\n" not in str(before_ray.value)
    load_serve_config(tiny_model_dir, ["serve.quantize=none"])  # only int8 needs it
    with pytest.raises(ConfigError, match=r"pip install 'aigc-ray\[int8\]'"):
        quantize_int8(torch.nn.Sequential(torch.nn.Linear(4, 4)))  # a replica's own check
