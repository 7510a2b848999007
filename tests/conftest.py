"""Shared fixtures: a real local Ray cluster, the sample corpus and the built-in tiny model.

All three are session-scoped and reusable by any test (data, training, serving): Ray starts once
per test session, the corpus is written once and the tiny model folder is built once. So is one
short `aigc-ray train` that more than one module reads (test_eval, test_trackers, test_secrets).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os

import pytest

from aigc_ray.config import validate
from aigc_ray.data.read import document_text, validate_record
from aigc_ray.data.sample import write_sample_corpus
from aigc_ray.model import materialize_builtin

# Workers inherit this; forked tokenizers with threads on 2 cores only slow each other down.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s, and a run is over (or a report reaches
# Tune, or a checkpoint is registered) only at a poll: every training run waited ~1 s for it at
# its end. Polls are a few milliseconds; a missed one is only counted (dead after 10 minutes).
# The controller reads this from the driver (Ray Train hands it on); the raylet started by
# `ray_cluster`, subprocesses and their clusters inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

TINY_MODEL = {"vocab_size": 512, "n_embd": 64, "n_layer": 2, "n_head": 4, "tokenizer_docs": 400}


def pytest_collection_modifyitems(config, items):
    """Unit tests first: they are fast, and some assert that no Ray cluster is running yet."""
    items.sort(key=lambda item: 0 if f"{os.sep}unit{os.sep}" in str(item.fspath) else 1)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster (2 CPUs) for the whole session; yields `ray`.

    With its dashboard, as `aigc-ray` starts one: Ray Train's placement-group cleaner asks the
    state API whether a controller died, and without it the workers' CPUs of every trial that
    Tune stopped stay reserved until the next trial's data pipeline cannot get a CPU."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=True, logging_level=logging.WARNING,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    # The same settings `aigc_ray.cluster.start_ray` applies after connecting.
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def sample_corpus(tmp_path_factory) -> dict:
    """The sample support corpus (400 pairs, 400 conversations): {'jsonl': path, 'text': path,
    'chat': path, 'pairs': 400}."""
    return write_sample_corpus(tmp_path_factory.mktemp("sample"), num_pairs=400)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, sample_corpus) -> str:
    """A built-in tiny model folder (GPT-2 architecture, 512-token BPE trained on the sample
    corpus): an ordinary HF folder that `from_pretrained` and `load_tokenizer` read."""
    cfg = validate({
        "model": {"name_or_path": "builtin:tiny", "builtin": dict(TINY_MODEL)},
        "data": {"path": sample_corpus["jsonl"], "format": "jsonl", "prompt_field": "prompt",
                 "completion_field": "completion", "block_size": 128},
        "run": {"output_dir": str(tmp_path_factory.mktemp("runs")), "name": "tests"},
    })
    with open(sample_corpus["jsonl"], encoding="utf-8") as f:
        texts = [document_text(json.loads(line), cfg.data) for line in f]
    return str(materialize_builtin(cfg, texts))


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory, sample_corpus) -> str:
    """The same tiny shape built as `builtin:tiny` builds it for the tiny_chat config: its
    tokenizer (with the chat template) trained on the sample conversations, 512 positions."""
    cfg = validate({
        "model": {"name_or_path": "builtin:tiny", "builtin": dict(TINY_MODEL)},
        "data": {"path": sample_corpus["chat"], "chat_format": "openai", "block_size": 512},
        "run": {"output_dir": str(tmp_path_factory.mktemp("runs")), "name": "chat"},
    })
    with open(sample_corpus["chat"], encoding="utf-8") as f:
        texts = [document_text(validate_record(json.loads(line), cfg.data), cfg.data)
                 for line in f]
    return str(materialize_builtin(cfg, texts))


@pytest.fixture(scope="session")
def tracked_train_run(ray_cluster, sample_corpus, tiny_model_dir, tmp_path_factory) -> dict:
    """`aigc-ray train` as the CLI runs it from a shell: 4 steps on one worker, an evaluation
    every 2, every tracker on (TensorBoard, MLflow in its default store beside the run folder,
    W&B offline), the evaluation after training, and a serving API key on the command line (the
    worst case: W&B records the command line too). test_eval reads what it printed,
    test_trackers what each tracker holds, test_secrets that no file holds the key:
    {'out': output folder, 'dir': run folder, 'stdout': what it printed, 'key': the key}."""
    import secrets
    import sys

    from aigc_ray.cli import main

    out = tmp_path_factory.mktemp("tracked")
    key = f"sk-aigc-test-{secrets.token_hex(8)}"  # bytes no file would hold by chance
    argv = ["train", "tiny_cpu", f"model.name_or_path={tiny_model_dir}",
            f"data.path={sample_corpus['jsonl']}", "train.seed=0", "train.max_steps=4",
            "train.eval_every=2", "train.log_every=2", "scaling.num_workers=1",
            "run.trackers=[tensorboard, mlflow, wandb]", f"run.output_dir={out}",
            "run.name=tracked", "eval.generate_rows=4", "eval.max_tokens=4",
            f"serve.api_key={key}"]
    printed = io.StringIO()  # what capsys would hold: sys.stdout while it ran, Ray's echoes too
    with contextlib.redirect_stdout(printed), pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["aigc-ray", *argv])  # what the trackers see as the command
        code = main(argv)
    assert code == 0, printed.getvalue()[-3000:]
    return {"out": out, "dir": out / "tracked", "stdout": printed.getvalue(), "key": key}


@pytest.fixture(scope="session")
def random_lm():
    """A factory of small randomly initialized causal LMs of a transformers family ("llama",
    "mistral", ...) sized to a tokenizer: 2 layers of width 32, 4 query over 2 key/value heads;
    keyword arguments override the config."""
    def build(family: str, tokenizer, **overrides):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        settings = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(0)
        config = AutoConfig.for_model(family, **{**settings, **overrides})
        return AutoModelForCausalLM.from_config(config).eval()

    return build
