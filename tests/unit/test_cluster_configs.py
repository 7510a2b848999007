"""clusters/ and jobs/: every launcher config passes Ray's own validation, every KubeRay manifest
parses and runs a command our CLI accepts on a config that exists, images and resources agree
across manifests, and every job spec loads (bad ones fail with one line). No cluster needed."""

import copy
import os
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from aigc_ray.config import ConfigError, validate
from aigc_ray.jobs import JobSpec, aigc_commands, check_entrypoint, load_job_spec, runtime_env

REPO = Path(__file__).resolve().parents[2]
LAUNCHERS = sorted((REPO / "clusters").glob("*.yaml"))
MANIFESTS = sorted((REPO / "clusters" / "kuberay").glob("*.yaml"))
JOB_SPECS = sorted((REPO / "jobs").glob("*.yaml"))


def ray_validate(config: dict) -> None:
    """What `ray up` does before touching a cloud: fill in defaults, then check the schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.fixture(autouse=True)
def at_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)  # job specs upload `.`, the repo root, as the README says


def test_there_is_a_launcher_per_provider_and_a_manifest_per_kind():
    assert [p.stem for p in LAUNCHERS] == ["aws", "gcp", "local"]
    kinds = {yaml.safe_load(p.read_text())["kind"] for p in MANIFESTS}
    assert kinds == {"RayCluster", "RayJob", "RayService"}
    assert {p.stem for p in JOB_SPECS} >= {"train", "tune", "serve", "generate"}


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_configs_pass_rays_validation_and_install_like_the_readme(path):
    config = yaml.safe_load(path.read_text())
    ray_validate(config)
    broken = copy.deepcopy(config)
    broken["head_node_typo"] = "x"  # the same check refuses a typo: it is a real validation
    with pytest.raises(jsonschema.ValidationError):
        ray_validate(broken)
    header = path.read_text().split("\ncluster_name:")[0]
    assert f"ray up clusters/{path.name}" in header and "aigc-ray submit" in header
    assert config["setup_commands"][-2:] == [
        'python3 -m pip install --quiet "torch==2.13.0"',
        'python3 -m pip install --quiet "$HOME/aigc-ray[lora]"']
    assert config["file_mounts"]["~/aigc-ray"] == "."
    assert all("RAY_AUTH_MODE=token" in " ".join(config[k])
               for k in ("head_start_ray_commands", "worker_start_ray_commands"))


def _cluster_spec(manifest: dict) -> dict:
    spec = manifest["spec"]
    return spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec


def _containers(manifest: dict) -> list[dict]:
    cluster = _cluster_spec(manifest)
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_manifests_agree_on_image_resources_and_gpus():
    manifests = [yaml.safe_load(p.read_text()) for p in MANIFESTS]
    dockerfile = (REPO / "clusters" / "kuberay" / "Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60.0-py311-gpu" in dockerfile
    for launcher in ("aws.yaml", "gcp.yaml"):  # the launchers run the same Ray image
        docker = yaml.safe_load((REPO / "clusters" / launcher).read_text())["docker"]
        assert docker["worker_image"] == "rayproject/ray:2.60.0-py311-gpu"
    images = {c["image"] for m in manifests for c in _containers(m)}
    assert images == {"aigc-ray:0.1.0"}
    specs = [_cluster_spec(m) for m in manifests]
    assert all(s == specs[0] for s in specs)  # head and workers: the same in all three
    head = specs[0]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    worker = specs[0]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in head["limits"] and worker["limits"]["nvidia.com/gpu"] == "1"
    assert head["requests"] == head["limits"] and worker["requests"] == worker["limits"]


def test_manifests_let_kuberay_wire_the_token():
    # A token put in the containers' env by hand never reaches the autoscaler sidecar, the RayJob
    # submitter pod or the operator's own dashboard calls: every one of those would get a 401.
    for path in MANIFESTS:
        manifest = yaml.safe_load(path.read_text())
        assert _cluster_spec(manifest)["authOptions"] == {"mode": "token"}, path.name
        env = {e["name"] for c in _containers(manifest) for e in c.get("env", [])}
        assert not env & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}, path.name


def test_rayjob_runs_commands_the_cli_accepts_on_a_shipped_config():
    manifest = yaml.safe_load((REPO / "clusters" / "kuberay" / "rayjob.yaml").read_text())
    entrypoint = manifest["spec"]["entrypoint"]
    commands = aigc_commands(entrypoint)
    assert [c[0] for c in commands] == ["sample-data", "train"]
    assert commands[1][1] == "gpt2_gpu"
    check_entrypoint(JobSpec(entrypoint=entrypoint, runtime_env={"working_dir": None}),
                     "rayjob.yaml")  # parses each command, loads the config with its overrides


def test_rayservice_holds_the_serve_config_that_serve_build_writes():
    from ray.serve.schema import ServeDeploySchema

    manifest = yaml.safe_load((REPO / "clusters" / "kuberay" / "rayservice.yaml").read_text())
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    app = serve_config["applications"][0]
    assert app["import_path"] == "aigc_ray.serve:app_builder"
    assert app["args"]["checkpoint"].startswith("/mnt/cluster_storage/")
    cfg = validate({"serve": app["args"]["serve"], "model": app["args"]["model"]})
    assert cfg.serve.host == "0.0.0.0" and cfg.serve.port == serve_config["http_options"]["port"]
    ports = {p["containerPort"] for p in _containers(manifest)[0]["ports"]}
    assert cfg.serve.port in ports


@pytest.mark.parametrize("path", JOB_SPECS, ids=lambda p: p.name)
def test_job_specs_load_and_their_entrypoints_parse(path):
    spec = load_job_spec(str(path.relative_to(REPO)))
    assert aigc_commands(spec.entrypoint), "every shipped spec runs aigc-ray"
    env = runtime_env(spec)
    assert env["working_dir"] == str(REPO) and ".venv" in env["excludes"]
    assert f"aigc-ray submit jobs/{path.name}" in path.read_text().splitlines()[0]


def test_overrides_are_appended_to_the_entrypoint_and_checked():
    spec = load_job_spec("jobs/train_tiny_cpu.yaml", ["train.max_steps=5", "run.name=a-b"])
    assert spec.entrypoint.endswith("train tiny_cpu run.output_dir=/tmp/aigc-ray/runs "
                                    "train.max_steps=5 run.name=a-b")
    with pytest.raises(ConfigError, match="run.name"):  # a space is not a valid run name
        load_job_spec("jobs/train_tiny_cpu.yaml", ["run.name=x y"])


@pytest.mark.parametrize("text, words", [
    ("entrypont: aigc-ray train\n", "did you mean entrypoint"),
    ("entrypoint: aigc-ray trian tiny_cpu\n", "not a valid aigc-ray command"),
    ("entrypoint: aigc-ray train tiny_cpu train.lr=-1\n", "train.lr must be > 0"),
    ("entrypoint: aigc-ray train nope.yaml\n", "neither a shipped config nor a file"),
    ("entrypoint: aigc-ray train\nconfig: /etc/hostname\n", "outside working_dir"),
    ("entrypoint: aigc-ray train\nruntime_env: {workdir: .}\n", "did you mean working_dir"),
    ("entrypoint: aigc-ray train\nentrypoint_num_cpus: -1\n", "entrypoint_num_cpus"),
    ("[1, 2]\n", "must hold a mapping"),
])
def test_bad_job_specs_fail_with_one_line(tmp_path, text, words):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_job_spec(str(path))
    assert words in str(error.value) and "\n" not in str(error.value)


def _tiny_config(folder: Path) -> Path:
    from aigc_ray.config import shipped_configs

    (folder / "configs").mkdir()
    config = folder / "configs" / "mine.yaml"
    config.write_text(shipped_configs()["tiny_cpu"].read_text())
    return config


def test_a_config_file_in_working_dir_is_loaded_as_the_job_will(tmp_path):
    config = _tiny_config(tmp_path)
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"entrypoint: aigc-ray train configs/mine.yaml train.max_steps=3\n"
                    f"config: {config}\nruntime_env: {{working_dir: {tmp_path}}}\n")
    assert load_job_spec(str(spec)).config == str(config)
    spec.write_text(f"entrypoint: aigc-ray train configs/mine.yaml train.lrr=1\n"
                    f"runtime_env: {{working_dir: {tmp_path}}}\n")
    with pytest.raises(ConfigError, match="did you mean train.lr"):
        load_job_spec(str(spec))


@pytest.mark.parametrize("entrypoint, extra, words", [
    ("aigc-ray train {config}", "", "name it relative to working_dir: configs/mine.yaml"),
    ("aigc-ray train /etc/hostname", "", "move it into working_dir"),
    ("aigc-ray train configs/mine.yaml", "", None),
    ("aigc-ray train tiny_cpu", "config: {config}\n", "not what the entrypoint runs"),
    ("aigc-ray train configs/mine.yaml", "config: /etc/hostname\n", "outside working_dir"),
])
def test_configs_must_travel_with_the_job(tmp_path, entrypoint, extra, words):
    config = _tiny_config(tmp_path)
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"entrypoint: {entrypoint.format(config=config)}\n"
                    f"{extra.format(config=config)}runtime_env: {{working_dir: {tmp_path}}}\n")
    if words is None:
        load_job_spec(str(spec))
        return
    with pytest.raises(ConfigError) as error:
        load_job_spec(str(spec))
    assert words in str(error.value) and "\n" not in str(error.value)


def test_without_working_dir_only_shipped_names_and_cluster_paths_pass(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("entrypoint: aigc-ray train configs/mine.yaml\n"
                    "runtime_env: {working_dir: null}\n")
    with pytest.raises(ConfigError, match="uploads no working_dir"):
        load_job_spec(str(spec))
    spec.write_text("entrypoint: aigc-ray train /mnt/cluster_storage/cfg.yaml\n"
                    "runtime_env: {working_dir: null}\n")
    load_job_spec(str(spec))  # a path on the cluster: nothing here to check it against


def test_address_flag_wins_over_ray_address(monkeypatch):
    import socket

    from aigc_ray.jobs import client

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")
    with pytest.raises(ConfigError) as error:  # Ray alone would try RAY_ADDRESS instead
        client(closed)
    assert f"Failed to connect to Ray at address: {closed}." in str(error.value)
    assert os.environ["RAY_ADDRESS"] == "http://127.0.0.1:1"  # put back
    with pytest.raises(ConfigError, match="RAY_ADDRESS=http://127.0.0.1:1"):
        client(None)


def test_shell_chains_are_split_into_commands():
    chain = "aigc-ray sample-data d && python -m aigc_ray train tiny_cpu; echo done"
    assert aigc_commands(chain) == [["sample-data", "d"], ["train", "tiny_cpu"]]
    assert shlex.split("a 'b c'") == ["a", "b c"]
