"""Building and loading models (aigc_ray/model.py): the built-in tiny model is an ordinary HF
folder, built once per settings and corpus; inference loads a folder on the device and dtype
asked for; a model path that cannot load is one line naming model.name_or_path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from aigc_ray.config import load_config, validate
from aigc_ray.errors import ConfigError
from aigc_ray.model import (
    builtin_model_dir,
    check_model_path,
    load_for_inference,
    materialize_builtin,
    resolve_device,
    resolve_dtype,
    resolve_model_path,
)
from aigc_ray.run_folder import CheckpointFolder

SMALL = {"vocab_size": 300, "n_embd": 32, "n_layer": 1, "n_head": 2, "tokenizer_docs": 100}


def builtin_config(corpus: dict, tmp_path, **builtin):
    return validate({
        "model": {"name_or_path": "builtin:tiny", "builtin": {**SMALL, **builtin}},
        "data": {"path": corpus["text"], "format": "text", "block_size": 64},
        "run": {"output_dir": str(tmp_path / "runs"), "name": "tiny"},
    })


def never_read():
    raise AssertionError("the corpus was read again for a model that already exists")
    yield  # a generator: the error comes only if someone iterates it


def test_the_builtin_model_is_an_hf_folder_built_once_per_settings(sample_corpus, tmp_path):
    texts = Path(sample_corpus["text"]).read_text().splitlines()[:100]
    cfg = builtin_config(sample_corpus, tmp_path)
    folder = materialize_builtin(cfg, texts)
    assert folder == builtin_model_dir(cfg) and folder.parent.parent == cfg.run.dir.parent
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no staging left behind

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.model_type == "gpt2" and model.config.n_layer == 1
    assert model.config.vocab_size == len(tokenizer) and model.config.n_positions >= 64
    text = "How do I reset my password?"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level: nothing lost
    assert tokenizer.chat_template  # the built-in template rides along

    # Built once: the same settings and corpus find the folder without reading the corpus.
    assert materialize_builtin(builtin_config(sample_corpus, tmp_path), never_read()) == folder
    # Other settings are another model, in a folder of their own.
    wider = builtin_config(sample_corpus, tmp_path, n_embd=64)
    assert builtin_model_dir(wider) != folder


def test_resolve_device_and_dtype():
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu" and resolve_device("cuda:1") == "cuda:1"
    assert resolve_dtype("auto", "cpu") == torch.float32  # CPU kernels want fp32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16  # asked for: given
    assert resolve_dtype("float16", "cuda") == torch.float16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_dtype_on_a_gpu_is_bfloat16_where_it_has_it():
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert resolve_dtype("auto", "cuda") == expected


def test_load_for_inference_gives_the_folder_s_model_in_eval_mode(tiny_model_dir):
    model, tokenizer = load_for_inference(tiny_model_dir, "cpu")
    assert not model.training and model.dtype == torch.float32
    assert next(model.parameters()).device.type == "cpu"
    ids = tokenizer("Where is my order?", return_tensors="pt")["input_ids"]
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)  # the same weights
    half, _ = load_for_inference(tiny_model_dir, "cpu", "bfloat16")
    assert half.dtype == torch.bfloat16


def test_load_for_inference_takes_as_many_torch_threads_as_ray_gave_it(tiny_model_dir):
    before = torch.get_num_threads()
    try:
        load_for_inference(tiny_model_dir, "cpu", threads=2.5)  # serve.cpus_per_replica=2.5
        assert torch.get_num_threads() == 2
        load_for_inference(tiny_model_dir, "cpu", threads=0.5)  # a share of one CPU: one thread
        assert torch.get_num_threads() == 1
        torch.set_num_threads(3)
        load_for_inference(tiny_model_dir, "cpu")  # not given: torch's own setting stays
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_model_paths_that_load_pass(tiny_model_dir, tmp_path, monkeypatch):
    check_model_path(load_config(None))  # builtin:tiny: built later, from the corpus
    check_model_path(load_config(None, [f"model.name_or_path={tiny_model_dir}"]))
    monkeypatch.chdir(Path(tiny_model_dir).parent)
    name = Path(tiny_model_dir).name
    assert resolve_model_path(load_config(None, [f"model.name_or_path={name}"])) == str(
        Path(tiny_model_dir).resolve())  # a relative folder: absolute, for every worker
    assert resolve_model_path(load_config(None, ["model.name_or_path=org/model"])) == "org/model"


def error_for(name: str) -> str:
    with pytest.raises(ConfigError) as error:
        check_model_path(load_config(None, [f"model.name_or_path={name}"]))
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"model.name_or_path {name}")
    return message


def test_a_missing_folder_is_one_line_naming_what_to_pass(tmp_path):
    message = error_for(str(tmp_path / "no-such-model"))
    assert message.endswith("does not exist; name a local Hugging Face model folder, a hub id, "
                            "or builtin:tiny")


def test_a_folder_that_is_not_a_model_is_one_line(tmp_path):
    (tmp_path / "notes").mkdir()
    message = error_for(str(tmp_path / "notes"))
    assert CheckpointFolder(tmp_path / "notes").model_config.name in message  # what is missing
    assert "builtin:tiny" in message


def test_an_uncached_hub_id_offline_says_so_at_once(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    message = error_for("no-such-org/no-such-model")
    assert "not in the local Hugging Face cache, and HF_HUB_OFFLINE is set" in message
    assert "a hub id the network can reach" in message


# --- model.init: random --------------------------------------------------------------------


def config_only_folder(tmp_path, vocabulary: int) -> str:
    """A folder with a Qwen2 config.json and nothing else (no weights, no tokenizer)."""
    from transformers import Qwen2Config

    folder = tmp_path / f"qwen-{vocabulary}"
    Qwen2Config(vocab_size=vocabulary, hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=256).save_pretrained(folder)
    return str(folder)


def random_init_config(tmp_path, folder: str, tokenizer: str | None, seed: int = 0):
    from aigc_ray.config import load_config

    return load_config("tiny_cpu", [f"model.name_or_path={folder}", "model.init=random",
                                    *([f"model.tokenizer={tokenizer}"] if tokenizer else []),
                                    f"train.seed={seed}", f"run.output_dir={tmp_path}/runs"])


def test_random_init_builds_the_architecture_from_its_config_with_seeded_fresh_weights(
        tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from aigc_ray.model import check_model_path, resolve_model_path
    from aigc_ray.tokenizer import load_tokenizer

    folder = config_only_folder(tmp_path, 151_936)
    cfg = random_init_config(tmp_path, folder, tiny_model_dir)
    check_model_path(cfg)  # the tokenizer (512 tokens) fits the 151,936-token embedding
    built = resolve_model_path(cfg)
    assert resolve_model_path(cfg) == built  # built once
    model = AutoModelForCausalLM.from_pretrained(built)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.get_input_embeddings().weight.shape == (151_936, 32)
    assert len(load_tokenizer(built)) == len(load_tokenizer(tiny_model_dir))
    other = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(random_init_config(tmp_path, folder, tiny_model_dir, seed=1)))
    first = model.model.layers[0].mlp.up_proj.weight
    assert not torch.equal(first, other.model.layers[0].mlp.up_proj.weight)  # seeded


def test_random_init_with_a_tokenizer_the_architecture_cannot_hold_fails_in_one_line(
        tmp_path, tiny_model_dir):
    from aigc_ray.errors import ConfigError
    from aigc_ray.model import check_model_path

    folder = config_only_folder(tmp_path, 256)  # the tiny tokenizer has 512 tokens
    with pytest.raises(ConfigError, match="has 512 tokens, more than the 256") as error:
        check_model_path(random_init_config(tmp_path, folder, tiny_model_dir))
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="set model.tokenizer"):  # no tokenizer at all
        check_model_path(random_init_config(tmp_path, folder, None))
