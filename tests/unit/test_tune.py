"""The search space is checked by the schema: bad keys, distributions and bounds fail with one
line naming the key, before Ray starts (nothing here starts Ray)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import ray

from aigc_ray.cli import main
from aigc_ray.config import leaf_keys, load_config, pbt_mutations
from aigc_ray.errors import ConfigError
from aigc_ray.tune import linked_copy, scheduler, trials_at_once


def space_error(override: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config("tiny_tune", [f"tune.search_space={override}"])
    message = str(info.value)
    assert "\n" not in message
    return message


def test_the_shipped_search_space_is_valid():
    cfg = load_config("tiny_tune")
    assert set(cfg.tune.search_space) == {"train.lr", "train.warmup_steps"}


def test_every_distribution_is_accepted():
    cfg = load_config("tiny_tune", [
        "tune.search_space={train.lr: {loguniform: [1.0e-4, 1.0e-2]}, "
        "train.weight_decay: {uniform: [0.0, 0.2]}, train.warmup_steps: {randint: [0, 40]}, "
        "train.batch_size: {choice: [4, 8]}, train.lora.r: {grid: [4, 8]}}"])
    assert len(cfg.tune.search_space) == 5


@pytest.mark.parametrize("override, expected", [
    ("{train.lrr: {uniform: [0, 1]}}",
     "tune.search_space key train.lrr is not a config value to search"),
    ("{train: {choice: [1]}}", "tune.search_space key train is not a config value"),
    ("{tune.seed: {choice: [1, 2]}}", "tune.search_space key tune.seed is not a config value"),
    ("{train.lr: {normal: [0, 1]}}",
     "tune.search_space train.lr must be one of {loguniform, uniform, randint, choice, grid"),
    ("{train.lr: {loguniform: [0.01, 0.001]}}",
     "tune.search_space train.lr loguniform needs [low, high] with low < high"),
    ("{train.lr: {loguniform: [0, 0.1]}}", "tune.search_space train.lr loguniform needs low > 0"),
    ("{train.lr: {uniform: [-1, 0.1]}}",
     "tune.search_space train.lr: train.lr must be > 0.0, got -1"),
    ("{train.warmup_steps: {randint: [0.5, 4]}}",
     "tune.search_space train.warmup_steps randint needs whole numbers"),
    ("{train.batch_size: {choice: []}}",
     "tune.search_space train.batch_size choice needs a non-empty list"),
    ("{train.batch_size: {grid: [4, x]}}",
     "tune.search_space train.batch_size: train.batch_size must be a whole number, got 'x'"),
    ("{train.lr_schedule: {choice: [cosine, step]}}",
     "tune.search_space train.lr_schedule: train.lr_schedule must be one of"),
])
def test_bad_search_spaces_name_the_key(override, expected):
    assert space_error(override).startswith(expected)


def test_an_unknown_key_suggests_the_closest():
    assert space_error("{train.lrr: {uniform: [0.1, 1]}}").endswith("did you mean train.lr?")


def test_leaf_keys_are_values_not_sections():
    keys = leaf_keys()
    assert "train.lr" in keys and "train.lora.r" in keys and "serve.autoscaling.max_replicas" in keys
    assert "train" not in keys and "train.lora" not in keys


def test_cli_tune_with_a_bad_space_fails_before_ray_starts(capsys):
    was_running = ray.is_initialized()
    assert main(["tune", "tiny_tune", "tune.search_space={train.lrr: {uniform: [0, 1]}}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: tune.search_space key train.lrr") and err.count("\n") == 1
    assert ray.is_initialized() is was_running


@pytest.mark.parametrize("overrides, expected", [
    (["tune.pbt.perturbation_interval=45"],
     "tune.pbt.perturbation_interval must be a multiple of train.eval_every (30)"),
    (["tune.pbt.mutate=[train.batch_size]"],
     "tune.pbt.mutate key train.batch_size is not in tune.search_space"),
    (["tune.search_space={train.lora.r: {choice: [4, 8]}}", "tune.pbt.mutate=[train.lora.r]"],
     "tune.pbt.mutate key train.lora.r cannot change mid-run"),
    (["tune.search_space={model.builtin.n_layer: {choice: [1, 2]}}"],
     "tune.scheduler pbt needs a key to mutate"),
    (["tune.search_alg=optuna"], "tune.scheduler pbt takes no search algorithm"),
])
def test_pbt_settings_are_checked_before_ray_starts(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config("tiny_tune", ["tune.scheduler=pbt", *overrides])
    assert str(info.value).startswith(expected) and "\n" not in str(info.value)


def test_pbt_mutates_searched_keys_and_keeps_them_in_bounds():
    cfg = load_config("tiny_tune", [
        "tune.scheduler=pbt", "tune.search_space={train.lr: {loguniform: [1.0e-4, 1.0e-2]}, "
        "train.batch_size: {choice: [4, 8]}, train.lora.r: {grid: [4, 8]}}"])
    assert pbt_mutations(cfg.tune) == ["train.lr", "train.batch_size"]  # not train.lora.r
    pbt = scheduler(cfg)
    assert pbt._perturbation_interval == cfg.train.eval_every
    assert pbt._hyperparam_mutations["train.batch_size"] == [4, 8]
    clip = pbt._custom_explore_fn
    assert clip({"train.lr": 0.05, "train.batch_size": 8}) == {"train.lr": 1.0e-2,
                                                               "train.batch_size": 8}
    assert clip({"train.lr": 2e-3})["train.lr"] == 2e-3


def test_pbt_refuses_a_population_that_cannot_train_at_once():
    cfg = load_config("tiny_tune", ["tune.scheduler=pbt", "tune.num_samples=3",
                                    "tune.max_concurrent_trials=2"])
    with pytest.raises(ConfigError) as info:
        trials_at_once(cfg)
    message = str(info.value)
    assert message.startswith("tune.scheduler pbt trains its 3 trials at once but only 2 fit "
                              "(tune.max_concurrent_trials)") and "\n" not in message


def test_a_staged_checkpoint_outlives_the_original(tmp_path):
    """Hard links: Train may delete its checkpoint before Tune has copied the staged one."""
    original = tmp_path / "checkpoint_1"
    original.mkdir()
    (original / "model.safetensors").write_bytes(b"weights")
    staged = Path(linked_copy(str(original), tmp_path / "staging" / "step-10"))
    shutil.rmtree(original)
    assert (staged / "model.safetensors").read_bytes() == b"weights"
