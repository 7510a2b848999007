"""A model folder to use and the config that goes with it (aigc_ray/checkpoint.py): which folder
a path means, the one-line refusals before Ray starts, and how the saved config.yaml, a
command's own sections and its key=value overrides combine. Real folders, written as `aigc-ray
train` writes them (a transformers config.json and our to_yaml beside it)."""

from __future__ import annotations

import pytest
import yaml
from transformers import GPT2Config

from aigc_ray.checkpoint import checkpoint_config, resolve_checkpoint
from aigc_ray.config import load_config, to_yaml
from aigc_ray.errors import ConfigError
from aigc_ray.run_folder import CheckpointFolder, RunFolder

KEYS = ("generate", "model.trust_remote_code")  # as a command names what it takes


def model_folder(path) -> CheckpointFolder:
    folder = CheckpointFolder(path)
    GPT2Config(vocab_size=64, n_positions=32, n_embd=8, n_layer=1, n_head=2).save_pretrained(path)
    return folder


@pytest.fixture
def run(tmp_path) -> RunFolder:
    """A trained run: final/ holds a model and the run's resolved config."""
    run = RunFolder(tmp_path / "my-run")
    final = model_folder(run.final)
    cfg = load_config("tiny_cpu", ["train.lr=0.002", "generate.max_tokens=33",
                                   "generate.temperature=0.7", "model.trust_remote_code=true"])
    final.config.write_text(to_yaml(cfg))
    return run


def test_a_run_folder_means_its_final_folder_and_a_model_folder_itself(run, monkeypatch):
    assert resolve_checkpoint(str(run.path)) == run.final.resolve()
    assert resolve_checkpoint(str(run.final)) == run.final.resolve()
    monkeypatch.chdir(run.path)
    assert resolve_checkpoint(run.final.name) == run.final.resolve()  # absolute, wherever it was named


@pytest.mark.parametrize("config_json, words", [
    (None, "does not exist; pass a model folder such as runs/tiny-cpu/final"),
    ("", "is not a Hugging Face model folder (no config.json)"),
    ("{not json", "config.json names no model_type"),
    ('["gpt2"]', "config.json names no model_type"),
    ('{"vocab_size": 64}', "config.json names no model_type"),
])
def test_a_path_that_is_not_a_model_folder_is_one_line_naming_it(tmp_path, config_json, words):
    path = tmp_path / "checkpoint_000003"
    if config_json is not None:
        path.mkdir()
    if config_json:
        CheckpointFolder(path).model_config.write_text(config_json)
    with pytest.raises(ConfigError) as error:
        resolve_checkpoint(str(path))
    message = str(error.value)
    assert words in message and str(path) in message and "\n" not in message


def test_the_saved_config_is_the_base_and_overrides_win(run):
    path, cfg = checkpoint_config(str(run.path), ["generate.max_tokens=12"], KEYS, "generate")
    assert path == run.final.resolve()
    assert cfg.generate.max_tokens == 12  # the override
    assert cfg.generate.temperature == 0.7  # the checkpoint's
    assert cfg.model.trust_remote_code is True  # a dotted key: that value only
    assert cfg.model.name_or_path == "builtin:tiny" and cfg.train.lr != 0.002  # not asked for


def test_a_command_s_own_sections_merge_between_the_saved_config_and_the_overrides(run):
    _, cfg = checkpoint_config(str(run.path), ["generate.max_tokens=9"], KEYS, "generate",
                               extra={"generate": {"max_tokens": 20, "batch_size": 4}})
    assert (cfg.generate.max_tokens, cfg.generate.batch_size, cfg.generate.temperature) == (
        9, 4, 0.7)


def test_a_model_folder_aigc_ray_did_not_write_takes_the_schema_defaults(tmp_path):
    model_folder(tmp_path / "my-own-model")
    _, cfg = checkpoint_config(str(tmp_path / "my-own-model"), ["generate.seed=5"], KEYS,
                               "generate")
    assert cfg.generate.seed == 5
    assert cfg.generate.max_tokens == load_config(None).generate.max_tokens


def test_a_saved_config_from_another_version_drops_the_keys_this_one_lacks(run):
    saved = yaml.safe_load(CheckpointFolder(run.final).config.read_text())
    saved["generate"]["beam_width"] = 4  # a key a later version added
    saved["distill"] = {"teacher": "big"}  # a whole section
    CheckpointFolder(run.final).config.write_text(yaml.safe_dump(saved))
    _, cfg = checkpoint_config(str(run.path), [], KEYS, "generate")
    assert cfg.generate.max_tokens == 33 and "beam_width" not in cfg.generate.model_dump()


@pytest.mark.parametrize("overrides, extra, words", [
    (["train.lr=1"], None,
     "'train.lr=1': generate takes generate.key=value, model.trust_remote_code=value overrides"),
    (["generate.max_tokens"], None, "generate takes generate.key=value"),
    ([], {"serve": {"port": 1}}, "serve is not a generate option"),
    (["generate.max_tokens=0"], None, "generate.max_tokens must be >= 1"),
])
def test_overrides_outside_the_command_s_keys_fail_with_one_line(run, overrides, extra, words):
    with pytest.raises(ConfigError) as error:
        checkpoint_config(str(run.path), overrides, KEYS, "generate", extra=extra)
    assert words in str(error.value) and "\n" not in str(error.value)


def test_a_broken_saved_config_says_which_file_to_fix(run):
    saved = CheckpointFolder(run.final).config
    saved.write_text("generate: {max_tokens: [1\n")
    with pytest.raises(ConfigError) as error:
        checkpoint_config(str(run.path), [], KEYS, "generate")
    assert str(error.value) == f"{saved.resolve()} is not valid YAML; fix or delete it"
