"""clusters/: every launcher config passes Ray's own validation, every KubeRay manifest parses
and runs a command our CLI accepts on a config that exists, images and resources agree across
manifests. No cluster needed. The job specs in jobs/ are tested in test_job_specs.py."""

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

from aigc_ray.cli import build_parser
from aigc_ray.config import validate
from aigc_ray.jobs import JobSpec, aigc_commands, check_entrypoint

REPO = Path(__file__).resolve().parents[2]
LAUNCHERS = sorted((REPO / "clusters").glob("*.yaml"))
MANIFESTS = sorted((REPO / "clusters" / "kuberay").glob("*.yaml"))


def ray_validate(config: dict) -> None:
    """What `ray up` does before touching a cloud: fill in defaults, then check the schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.fixture(autouse=True)
def at_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)  # the launchers mount `.`, the repo root, as the README says


def test_there_is_a_launcher_per_provider_and_a_manifest_per_kind():
    assert [p.stem for p in LAUNCHERS] == ["aws", "gcp", "local"]
    kinds = {yaml.safe_load(p.read_text())["kind"] for p in MANIFESTS}
    assert kinds == {"RayCluster", "RayJob", "RayService"}


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
                     "rayjob.yaml", build_parser())  # parses each command, loads its config


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
