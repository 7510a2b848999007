"""Serving config: checkpoint config.yaml as the base, serve.* overrides, one-line errors,
and the Ray Serve config file `--build` writes (all without starting Ray)."""

import shutil

import pytest
import yaml

from aigc_ray.checkpoint import checkpoint_config
from aigc_ray.cli import main
from aigc_ray.errors import ConfigError
from aigc_ray.run_folder import CheckpointFolder, RunFolder
from aigc_ray.serve import app_builder, load_serve_config, model_name_for, write_serve_config
from aigc_ray.serve.app import SERVE_KEYS


@pytest.fixture
def run_dir(tiny_model_dir, tmp_path):
    """A run folder whose final/ holds the tiny model and a config.yaml like train writes."""
    run = RunFolder(tmp_path / "my-run")
    shutil.copytree(tiny_model_dir, run.final)
    CheckpointFolder(run.final).config.write_text(yaml.safe_dump({
        "train": {"lr": 0.001},
        "serve": {"max_batch_size": 4, "min_replicas": 1,  # min_replicas: an older key
                  "autoscaling": {"max_replicas": 3}}}))
    return run.path


def test_checkpoint_config_is_the_base_and_overrides_win(run_dir):
    path, cfg = load_serve_config(str(run_dir), ["serve.max_batch_size=12", "serve.port=8100"])
    assert path == RunFolder(run_dir).final.resolve()  # a run folder means its final/
    assert cfg.serve.max_batch_size == 12 and cfg.serve.port == 8100
    assert cfg.serve.autoscaling.max_replicas == 3  # from the checkpoint's config.yaml
    assert model_name_for(path, cfg) == "my-run/final"


@pytest.mark.parametrize("overrides, words", [
    (["train.lr=1"], "serve.key=value"),
    (["serve.max_batch_sise=4"], "did you mean serve.max_batch_size"),
    (["serve.autoscaling.min_replicas=3", "serve.autoscaling.max_replicas=2"], "must be <="),
    (["serve.quantize=int8"], "serve.quantize is not a known key"),  # int8 was dropped
    (["serve.default_max_tokens=99", "serve.max_tokens=10"], "serve.default_max_tokens"),
])
def test_bad_overrides_fail_with_one_line(run_dir, overrides, words):
    with pytest.raises(ConfigError) as error:
        load_serve_config(str(run_dir), overrides)
    assert words in str(error.value) and "\n" not in str(error.value)


def test_a_checkpoint_saved_with_serve_quantize_still_loads(run_dir):
    # Older versions wrote serve.quantize into config.yaml; the key is gone, and a saved config's
    # unknown keys describe that version, so they are dropped rather than refused.
    saved = CheckpointFolder(RunFolder(run_dir).final).config
    saved.write_text(yaml.safe_dump({"serve": {"quantize": "int8", "device": "cpu",
                                               "max_batch_size": 4}}))
    path, cfg = load_serve_config(str(run_dir))
    assert cfg.serve.device == "cpu" and cfg.serve.max_batch_size == 4
    assert "quantize" not in cfg.serve.model_dump()
    _, cfg = checkpoint_config(str(run_dir), ["serve.port=8100"], SERVE_KEYS, "serving", None)
    assert cfg.serve.port == 8100 and cfg.serve.max_batch_size == 4


def test_cli_rejects_a_missing_checkpoint_before_ray_starts(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: checkpoint") and "does not exist" in err and "\n" not in err


def test_build_writes_a_serve_deploy_config_that_app_builder_reads(run_dir, tmp_path, capsys):
    from ray.serve.schema import ServeDeploySchema

    out = tmp_path / "serve_config.yaml"
    assert main(["serve", str(run_dir), "serve.autoscaling.max_replicas=4",
                 "serve.api_key=secret", "--build", str(out)]) == 0
    text = out.read_text()
    assert "secret" not in text  # keys go in the environment, not in a file
    document = yaml.safe_load(text)
    ServeDeploySchema.model_validate(document)  # what `serve deploy` and KubeRay accept
    app = document["applications"][0]
    assert app["import_path"] == "aigc_ray.serve:app_builder"
    assert app["args"]["serve"]["autoscaling"]["max_replicas"] == 4
    built = app_builder(app["args"])  # builds the application graph; deploying needs Ray
    assert type(built).__name__ == "Application"
    # `serve run aigc_ray.serve:app_builder checkpoint=... serve.k=v` passes strings.
    assert type(app_builder({"checkpoint": str(run_dir), "serve.max_batch_size": "2"})).__name__ \
        == "Application"


def test_write_serve_config_round_trips_the_serve_section(run_dir, tmp_path):
    path, cfg = load_serve_config(str(run_dir), ["serve.host=0.0.0.0"])
    document = yaml.safe_load(write_serve_config(path, cfg, tmp_path / "s.yaml").read_text())
    assert document["http_options"] == {"host": "0.0.0.0", "port": 8000}
    assert document["applications"][0]["args"]["checkpoint"] == str(path)


def test_the_api_key_reaches_no_deployment_only_its_digest(run_dir, monkeypatch):
    # Deployment arguments, options and runtime env show on the dashboard and through the jobs
    # API: the key (from serve.api_key or AIGC_RAY_API_KEY) must be in none of them.
    import hashlib

    from aigc_ray.serve import build_app

    def everything(app) -> str:
        """Arguments and actor options of the app's deployments, the bound ones too."""
        deployment = app._bound_deployment
        seen = [repr(deployment.ray_actor_options)]
        for arg in deployment.init_args:
            seen.append(everything(arg) if type(arg).__name__ == "Application" else repr(arg))
        return " ".join(seen)

    for overrides, env in ((["serve.api_key=s3cret-key"], None), ([], "s3cret-key")):
        if env:
            monkeypatch.setenv("AIGC_RAY_API_KEY", env)
        path, cfg = load_serve_config(str(run_dir), overrides)
        shown = everything(build_app(path, cfg))
        assert "s3cret-key" not in shown and "runtime_env" not in shown
        assert hashlib.sha256(b"s3cret-key").hexdigest() in shown
