"""Config schema and the CLI's handling of config errors.

Nothing here starts Ray: these run in a second and guard the promise that a user's mistake
fails early with one line that says what to change.
"""

from __future__ import annotations

import pytest
import ray
import yaml

import aigc_ray.cluster
from aigc_ray.cli import main
from aigc_ray.config import (
    REDACTED,
    Config,
    load_config,
    shipped_configs,
    to_yaml,
    validate,
)
from aigc_ray.errors import ConfigError

# ── Config ──────────────────────────────────────────────────────────────────────────────────


def test_ships_the_three_documented_configs():
    assert set(shipped_configs()) >= {"tiny_cpu", "tiny_text", "gpt2_gpu"}


@pytest.mark.parametrize("name", sorted(shipped_configs()))
def test_every_shipped_config_loads(name):
    cfg = load_config(name)
    assert isinstance(cfg, Config)
    # Each starts with the command that runs it, as the design asks.
    first_line = shipped_configs()[name].read_text().splitlines()[0]
    assert first_line.startswith("# aigc-ray ") and name in first_line
    # The resolved YAML is itself a valid config that resolves to the same thing.
    assert validate(yaml.safe_load(to_yaml(cfg))) == cfg


def test_default_config_is_tiny_cpu():
    assert load_config(None) == load_config("tiny_cpu")
    assert load_config(None).model.name_or_path == "builtin:tiny"


def test_overrides_patch_nested_keys_with_yaml_types():
    cfg = load_config(None, ["train.lr=0.01", "scaling.num_workers=4", "data.strict=true",
                             "train.sample_prompts=[a, b]", "model.builtin.n_layer=3"])
    assert cfg.train.lr == 0.01
    assert cfg.scaling.num_workers == 4
    assert cfg.data.strict is True
    assert cfg.train.sample_prompts == ["a", "b"]
    assert cfg.model.builtin.n_layer == 3


def _error(overrides: list[str], path: str | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message, "a config error is one line"
    return message


def test_negative_lr_names_the_key_and_the_bound():
    message = _error(["train.lr=-1"])
    assert message.startswith("train.lr must be > 0")
    assert message.endswith("got -1")


def test_unknown_key_suggests_the_closest_one():
    message = _error(["train.lrr=1"])
    assert "train.lrr is not a known key" in message
    assert "did you mean train.lr?" in message
    message = _error(["trian.lr=1"])
    assert "trian is not a known key" in message and "did you mean train?" in message


def test_unknown_key_in_yaml_file_is_refused(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("data:\n  block_sise: 64\n")
    message = _error([], str(path))
    assert "data.block_sise is not a known key" in message
    assert "did you mean data.block_size?" in message


def test_removed_serve_quantize_is_an_unknown_key_in_one_line(tmp_path):
    # serve.quantize (int8) was dropped: torchao's int8 ran slower than float32 on CPU.
    path = tmp_path / "cfg.yaml"
    path.write_text("serve:\n  quantize: int8\n")
    for message in (_error(["serve.quantize=int8"]), _error([], str(path))):
        assert message.startswith("serve.quantize is not a known key") and "\n" not in message


def test_bad_literal_lists_the_choices():
    message = _error(["data.format=csv"])
    assert message.startswith("data.format must be one of")
    assert "'jsonl'" in message and "'parquet'" in message and message.endswith("got 'csv'")


def test_wrong_type_says_what_is_expected():
    assert _error(["train.batch_size=abc"]) == "train.batch_size must be a whole number, got 'abc'"
    assert _error(["train.lr=abc"]) == "train.lr must be a number, got 'abc'"
    assert _error(["data.strict=maybe"]) == "data.strict must be true or false, got 'maybe'"


def test_prompt_field_without_completion_field():
    with pytest.raises(ConfigError, match="^data.prompt_field and data.completion_field must be "
                                          "set together$"):
        validate({"data": {"format": "jsonl", "prompt_field": "prompt"}})
    # The same through an override that removes one of the pair from a shipped config.
    message = _error(["data.completion_field=null"])
    assert message == "data.prompt_field and data.completion_field must be set together"


def test_text_format_cannot_have_prompt_fields():
    message = _error(["data.format=text"])  # tiny_cpu sets prompt/completion fields
    assert message.startswith("data.format text has no prompt/completion fields")
    # It says what to change: the text config, or the two keys to clear.
    assert "tiny_text" in message and "data.prompt_field=null data.completion_field=null" in message


def test_chat_settings_that_cannot_work_together():
    assert "data.prompt_field=null" in _error(["data.chat_format=openai"])
    assert "data.format text holds plain lines" in _error(
        ["data.chat_format=openai", "data.format=text", "data.prompt_field=null",
         "data.completion_field=null"])
    assert "unknown key(s) speakers" in _error(
        ["data.chat_format=sharegpt", "data.prompt_field=null", "data.completion_field=null",
         "data.chat_fields={speakers: who}"])
    assert "data.train_on applies to conversations" in _error(["data.train_on=all"])


def test_cpu_offload_needs_fsdp_on_gpus():
    assert load_config("tiny_cpu").scaling.strategy == "ddp"
    assert _error(["scaling.strategy=zero3"]).startswith("scaling.strategy must be one of")
    message = _error(["scaling.strategy=fsdp", "scaling.cpu_offload=true"])  # tiny_cpu: no GPU
    assert message.startswith("scaling.cpu_offload moves FSDP shards from the GPU")
    assert "scaling.use_gpu=true" in message
    assert "scaling.strategy=fsdp" in _error(["scaling.use_gpu=true", "scaling.cpu_offload=true"])


def test_unknown_builtin_model():
    message = _error(["model.name_or_path=builtin:huge"])
    assert message == ("model.name_or_path 'builtin:huge' is not a built-in model "
                       "(built-in: builtin:tiny)")


@pytest.mark.parametrize("override", ["train.lr", "=3", "train..lr=3", ".lr=3"])
def test_malformed_override(override):
    assert _error([override]) == f"override {override!r} must look like section.key=value"


def test_override_into_a_value_is_refused():
    assert _error(["train.lr.x=1"]) == "train.lr is a value, not a section; cannot set train.lr.x"


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- train\n- lr\n")
    assert _error([], str(path)) == f"{path} must hold a mapping of sections, got list"
    with pytest.raises(ConfigError, match="^a config must be a mapping of sections, got list$"):
        validate(["train"])


def test_invalid_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  lr: 0.1\n  batch_size: [8\n")
    message = _error([], str(path))
    assert message.startswith(f"{path} line ")
    assert "is not valid YAML" in message


def test_unknown_config_name_lists_shipped_ones():
    message = _error([], "no_such_config")
    assert message.startswith("config 'no_such_config' is neither a file nor a shipped config")
    assert "tiny_cpu" in message


def test_empty_yaml_file_means_all_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(str(path)) == Config()


def test_several_problems_are_counted_in_one_line():
    message = _error(["train.lr=-1", "train.batch_size=0"])
    assert message.endswith("(and 1 more problem(s))")


@pytest.mark.parametrize("name", [".", ".."])
def test_a_run_name_that_leaves_the_output_dir_is_refused(name):
    # `..` would put the run beside run.output_dir and its export would replace ../final.
    assert _error([f"run.name={name}"]) == (
        f"run.name {name!r} would not be a folder inside run.output_dir; name the run, e.g. "
        "run.name=tiny-cpu")
    assert load_config(None, ["run.name=v1..v2"]).run.dir.name == "v1..v2"


def test_an_mlflow_uri_naming_a_folder_becomes_a_sqlite_store_inside_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def uri(value: str) -> str:
        return load_config(None, [f"run.mlflow_uri={value}"]).run.mlflow_uri

    assert uri("tracking") == f"sqlite:///{tmp_path}/tracking/mlflow.db"
    assert uri(f"file://{tmp_path}/mlruns") == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert uri("store.db") == f"sqlite:///{tmp_path}/store.db"
    for untouched in ("http://mlflow.internal:5000", "sqlite:////srv/mlflow.db", "databricks"):
        assert uri(untouched) == untouched
    # Read back from a saved config.yaml elsewhere, it stays the same store.
    cfg = load_config(None, ["run.mlflow_uri=tracking"])
    monkeypatch.chdir("/")
    assert validate(yaml.safe_load(to_yaml(cfg))).run.mlflow_uri == cfg.run.mlflow_uri


# ── The serving API key ─────────────────────────────────────────────────────────────────────


def test_the_api_key_is_never_in_the_saved_yaml_and_serving_it_asks_for_the_key_again(
        monkeypatch):
    monkeypatch.delenv("AIGC_RAY_API_KEY", raising=False)
    cfg = load_config(None, ["serve.api_key=sk-live-123"])
    assert cfg.serve.resolve_api_key() == "sk-live-123"
    saved = to_yaml(cfg)
    assert "sk-live-123" not in saved and f"api_key: {REDACTED}" in saved
    reloaded = validate(yaml.safe_load(saved))
    # Serving the saved config without the key would silently drop the protection.
    with pytest.raises(ConfigError) as info:
        reloaded.serve.resolve_api_key()
    assert "pass it again with AIGC_RAY_API_KEY=KEY or serve.api_key_file=FILE" in str(info.value)
    monkeypatch.setenv("AIGC_RAY_API_KEY", "from-the-environment")
    assert reloaded.serve.resolve_api_key() == "from-the-environment"
    assert load_config(None).serve.resolve_api_key() == "from-the-environment"
    # Without any key set nothing is asked for, and nothing is redacted.
    monkeypatch.delenv("AIGC_RAY_API_KEY")
    assert load_config(None).serve.resolve_api_key() is None
    assert "api_key: null" in to_yaml(load_config(None))


def test_the_api_key_file_is_read_when_serving_and_wins_over_the_environment(tmp_path,
                                                                             monkeypatch):
    key_file = tmp_path / "key"
    key_file.write_text("sk-from-file\n")  # `echo KEY > FILE` adds the line end
    monkeypatch.setenv("AIGC_RAY_API_KEY", "from-the-environment")
    cfg = load_config(None, [f"serve.api_key_file={key_file}"])
    assert cfg.serve.resolve_api_key() == "sk-from-file"
    assert str(key_file) in to_yaml(cfg) and "sk-from-file" not in to_yaml(cfg)
    assert _error(["serve.api_key=a", f"serve.api_key_file={key_file}"]).startswith(
        "serve.api_key and serve.api_key_file are both set; keep one")


@pytest.mark.parametrize("make, words", [
    (lambda folder: folder / "missing", "does not exist; write the key to it"),
    (lambda folder: folder, "cannot be read (Is a directory)"),
    (lambda folder: (folder / "empty").write_text(" \n") and folder / "empty", "is empty"),
    (lambda folder: (folder / "bin").write_bytes(b"\xff\xfe") and folder / "bin",
     "cannot be read (UnicodeDecodeError)"),
])
def test_a_key_file_that_cannot_give_a_key_is_one_line(tmp_path, make, words):
    path = make(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"serve.api_key_file={path}"]).serve.resolve_api_key()
    message = str(info.value)
    assert message.startswith(f"serve.api_key_file {path} ") and words in message
    assert "\n" not in message


def test_cli_config_prints_the_api_key_redacted(capsys):
    assert main(["config", "serve.api_key=sk-live-123"]) == 0
    out = capsys.readouterr().out
    assert "sk-live-123" not in out and yaml.safe_load(out)["serve"]["api_key"] == REDACTED


# ── CLI ─────────────────────────────────────────────────────────────────────────────────────


def test_cli_config_error_is_one_line_on_stderr(capsys):
    assert main(["config", "train.lr=-1"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.endswith("\n")
    assert err.startswith("error: train.lr must be > 0")


def test_cli_config_prints_resolved_yaml(capsys):
    assert main(["config", "train.lr=0.01"]) == 0
    out, err = capsys.readouterr()
    resolved = yaml.safe_load(out)
    assert resolved["train"]["lr"] == 0.01
    assert resolved["model"]["name_or_path"] == "builtin:tiny"
    assert validate(resolved) == load_config(None, ["train.lr=0.01"])


def test_cli_config_takes_a_named_config(capsys):
    assert main(["config", "tiny_text", "train.max_steps=7"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["data"]["format"] == "text" and resolved["train"]["max_steps"] == 7


def test_cli_argument_after_config_must_be_key_value(capsys):
    assert main(["config", "tiny_cpu", "train.lr"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: 'train.lr' is not key=value; only the first argument may name a "
                   "config\n")


def test_cli_data_with_missing_file_fails_before_ray_starts(capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(aigc_ray.cluster, "start_ray", lambda *a, **k: calls.append(a))
    was_running = ray.is_initialized()
    assert main(["data", "data.path=/nonexistent/x.jsonl"]) == 2
    err = capsys.readouterr().err
    assert err == "error: data.path /nonexistent/x.jsonl does not exist\n"
    assert calls == []
    assert ray.is_initialized() is was_running
    if not was_running:  # the normal case: unit tests run before any fixture starts Ray
        assert ray.is_initialized() is False


def test_cli_missing_sample_corpus_says_how_to_write_it(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/sample here
    assert main(["data"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "data.path data/sample/support.jsonl does not exist" in err
    assert "aigc-ray sample-data data/sample" in err
