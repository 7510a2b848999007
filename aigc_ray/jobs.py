"""Cluster jobs: a job spec (YAML) → Ray's job submission API; list, status, logs, stop.

A job spec names what `ray job submit` takes, in a file that lives with the project:

    name: train-tiny-cpu                     # becomes the submission id's prefix
    entrypoint: aigc-ray train tiny_cpu train.max_steps=100
    config: my_config.yaml                   # optional: checked here, uploaded with working_dir
    runtime_env:
      working_dir: .                         # uploaded; relative paths are from where you submit
      excludes: [.venv, runs, .git]
      pip: ["aigc-ray"]                      # or uv: [...]; leave out when the image has it
      env_vars: {TOKENIZERS_PARALLELISM: "false"}
    entrypoint_num_cpus: 1
    entrypoint_num_gpus: 0
    entrypoint_resources: {}

Before anything reaches the cluster the spec is validated, each `aigc-ray ...` command in the
entrypoint is parsed by the CLI's own parser (the CLI hands it in: jobs sits below the CLI and
never imports it), and a train/tune entrypoint's config (with its overrides) is loaded, so a typo
fails here with one line instead of minutes later on the cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import io
import os
import shlex
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from aigc_ray.config import describe_error, load_config, shipped_configs, split_config_args
from aigc_ray.errors import ConfigError

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# Where Ray's job client looks for the address when it is given none, first match wins.
ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
TOKEN_HELP = ("put the cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN (Ray's token "
              "authentication)")
JOB_ACTIONS = ("list", "status", "logs", "stop", "delete")  # `aigc-ray jobs ACTION`


class RuntimeEnv(BaseModel):
    model_config = ConfigDict(extra="forbid")

    working_dir: str | None = "."  # uploaded to the cluster (Ray caps it at 512 MB)
    excludes: list[str] = [".venv", ".git", "runs", "data", "__pycache__", "*.egg-info"]
    pip: list[str] | None = None  # packages installed for the job (a cached virtualenv)
    uv: list[str] | None = None  # the same, installed with uv
    env_vars: dict[str, str] = {}
    py_modules: list[str] | None = None


class JobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("aigc-ray", pattern=r"^[A-Za-z0-9._-]+$")
    entrypoint: str = Field(min_length=1)
    config: str | None = None  # a config file the entrypoint names; must sit in working_dir
    runtime_env: RuntimeEnv = RuntimeEnv()
    entrypoint_num_cpus: float | None = Field(None, ge=0)
    entrypoint_num_gpus: float | None = Field(None, ge=0)
    entrypoint_memory: int | None = Field(None, ge=0)
    entrypoint_resources: dict[str, float] = {}
    metadata: dict[str, str] = {}


def load_job_spec(path: str, overrides: list[str] | None = None, *,
                  parser: argparse.ArgumentParser) -> JobSpec:
    """Read and check a job spec; `overrides` (key=value) are appended to the entrypoint, and its
    aigc-ray commands must parse with `parser` (the CLI's, `aigc_ray.cli.build_parser()`)."""
    spec_path = Path(path).expanduser()
    if not spec_path.is_file():
        raise ConfigError(f"job spec {path} does not exist (see jobs/ for examples)")
    try:
        raw = yaml.safe_load(spec_path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc.__class__.__name__}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping (entrypoint, runtime_env, ...)")
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as exc:
        # A misspelt key also makes the real one "missing": name the typo, it is the cause.
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        raise ConfigError(f"{path}: {_spec_error(errors[0])}") from None
    if overrides:
        spec.entrypoint = f"{spec.entrypoint} {shlex.join(overrides)}"
    check_entrypoint(spec, path, parser)
    return spec


def _spec_error(error: dict) -> str:
    """config's one-line description of a validation error; an unknown key is named against the
    job spec's keys (config's own list is the training config's)."""
    loc = [str(part) for part in error["loc"]]
    if error["type"] != "extra_forbidden":
        return describe_error(error)
    model = RuntimeEnv if loc[0] == "runtime_env" and len(loc) > 1 else JobSpec
    known = list(model.model_fields)
    close = difflib.get_close_matches(loc[-1], known, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"{'.'.join(loc)} is not a job spec key (known here: {', '.join(known)}){hint}"


def aigc_commands(entrypoint: str) -> list[list[str]]:
    """The `aigc-ray ...` (or `python -m aigc_ray ...`) commands in a shell entrypoint."""
    commands = []
    for part in entrypoint.replace("||", "&&").replace(";", "&&").split("&&"):
        try:
            words = shlex.split(part)
        except ValueError:
            raise ConfigError(f"entrypoint {entrypoint!r} has unbalanced quotes") from None
        if words[:1] == ["aigc-ray"]:
            commands.append(words[1:])
        elif len(words) > 2 and words[1:3] == ["-m", "aigc_ray"]:
            commands.append(words[3:])
    return commands


def check_entrypoint(spec: JobSpec, path: str, parser: argparse.ArgumentParser) -> None:
    """Parse each aigc-ray command with the CLI's `parser`; load train/tune configs with their
    overrides; a local working_dir and the spec's config must exist."""
    working_dir = None
    if spec.runtime_env.working_dir:
        working_dir = Path(spec.runtime_env.working_dir).expanduser().resolve()
        if not working_dir.exists():
            raise ConfigError(f"{path}: runtime_env.working_dir {spec.runtime_env.working_dir} "
                              "does not exist (relative paths are from where you submit)")
    if spec.config:
        config = Path(spec.config).expanduser().resolve()
        if not config.is_file():
            raise ConfigError(f"{path}: config {spec.config} does not exist")
        if working_dir is None:
            raise ConfigError(f"{path}: config {spec.config} would not reach the job: the spec "
                              "uploads no working_dir; set runtime_env.working_dir")
        if working_dir not in config.parents:
            raise ConfigError(f"{path}: config {spec.config} is outside working_dir "
                              f"{spec.runtime_env.working_dir}, so the job would not see it; "
                              "move it into working_dir")
        relative = str(config.relative_to(working_dir))
        if not any(relative in command for command in aigc_commands(spec.entrypoint)):
            raise ConfigError(f"{path}: config {spec.config} is not what the entrypoint runs; "
                              f"the job sees it as {relative} (e.g. aigc-ray train {relative})")
    for args in aigc_commands(spec.entrypoint):
        try:
            # The parser prints its own error too; the error below is the one line.
            with contextlib.redirect_stderr(io.StringIO()):
                ns, extra = parser.parse_known_args(args)
        except SystemExit:
            raise ConfigError(f"{path}: entrypoint `aigc-ray {shlex.join(args)}` is not a valid "
                              "aigc-ray command (see aigc-ray --help)") from None
        if extra and not all("=" in item for item in extra):
            raise ConfigError(f"{path}: entrypoint `aigc-ray {shlex.join(args)}`: unrecognized "
                              f"arguments {' '.join(extra)}")
        if ns.command in ("train", "tune"):
            _check_config_args(ns.args + extra, working_dir, path)


def _check_config_args(args: list[str], working_dir: Path | None, path: str) -> None:
    """Load a train/tune command's config with its overrides, as the job will. A config file
    must travel with the job: relative to working_dir, which is uploaded."""
    try:
        name, overrides = split_config_args(args)
    except ConfigError as exc:
        raise ConfigError(f"{path}: entrypoint config: {exc}") from None
    if name and name not in shipped_configs():
        file = Path(name).expanduser()
        if working_dir is None:
            if file.is_absolute():  # a path on the cluster's own disks: nothing to check here
                return
            raise ConfigError(f"{path}: the entrypoint's config {name} is a relative path but "
                              "the spec uploads no working_dir; set runtime_env.working_dir to "
                              "the folder that holds it, or name a shipped config")
        if file.is_absolute():
            file = file.resolve()
            where = (f"name it relative to working_dir: {file.relative_to(working_dir)}"
                     if working_dir in file.parents else
                     f"move it into working_dir {working_dir} and name it relative to it")
            raise ConfigError(f"{path}: the entrypoint's config {name} is an absolute path, "
                              f"which the job (running in an uploaded copy of working_dir) would "
                              f"not find; {where}")
        if not (working_dir / file).is_file():
            raise ConfigError(f"{path}: the entrypoint's config {name} is neither a shipped "
                              f"config nor a file in working_dir {working_dir}")
        name = str(working_dir / file)
    try:
        load_config(name, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: entrypoint config: {exc}") from None


def runtime_env(spec: JobSpec) -> dict[str, Any]:
    """The spec's runtime_env as Ray takes it: working_dir absolute, empty keys left out."""
    env = spec.runtime_env.model_dump(exclude_none=True)
    if "working_dir" in env:
        env["working_dir"] = str(Path(env["working_dir"]).expanduser().resolve())
    else:
        env.pop("excludes", None)
    if not env.get("env_vars"):
        env.pop("env_vars", None)
    return env


# ── talking to the cluster ───────────────────────────────────────────────────────────────────


def auth_token() -> str | None:
    """Ray's token, where Ray's own clients look for it: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH,
    then ~/.ray/auth_token (written when a local cluster first starts)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")).expanduser()
    if path.is_file():
        return path.read_text().strip() or None
    return None


def client(address: str | None):
    """A `JobSubmissionClient` for `--address`, else RAY_API_SERVER_ADDRESS or RAY_ADDRESS (Ray's
    own order), else the head `ray start --head` started on this machine.

    Ray's client lets RAY_ADDRESS override the address it is given; an explicit `--address`
    must win, so those variables are hidden while it resolves one. Ray sends the token only when
    this process has RAY_AUTH_MODE=token, but a `ray start` head turns token authentication on
    whenever a token exists, so we send the token we find (unless RAY_AUTH_MODE says otherwise)
    instead of leaving the user to export the mode."""
    from ray.job_submission import JobSubmissionClient

    headers = {}
    token = auth_token()
    if token and os.environ.get("RAY_AUTH_MODE", "token").lower() == "token":
        headers["Authorization"] = f"Bearer {token}"
    try:
        with _address_env_hidden(bool(address)):
            return JobSubmissionClient(address, headers=headers or None)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = address or next((f"{name}={os.environ[name]}" for name in ADDRESS_ENV
                                 if os.environ.get(name)), None) or (
            "the local Ray head (no --address and no RAY_ADDRESS)")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = TOKEN_HELP if "uthentication" in str(exc) else (
            "pass --address http://HEAD:8265 or set RAY_ADDRESS")
        raise ConfigError(f"cannot reach the Ray job API at {where}: {first[:200]}; "
                          f"{hint}") from None


@contextlib.contextmanager
def _address_env_hidden(hide: bool):
    saved = {name: os.environ.pop(name) for name in ADDRESS_ENV if hide and name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@contextlib.contextmanager
def job_api(what: str):
    """Ray's job client reports a refused request (an unknown job id, a runtime_env it cannot
    take) as RuntimeError with the HTTP status and body; one line of it instead."""
    try:
        yield
    except ConfigError:
        raise
    except (RuntimeError, ValueError) as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigError(f"{what}: {text[:300]}") from None


def submit(spec: JobSpec, address: str | None) -> tuple[Any, str]:
    """(client, submission id) of the submitted job."""
    jobs = client(address)
    submission_id = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    with job_api(f"the cluster refused job {spec.name}"):
        job_id = jobs.submit_job(
            entrypoint=spec.entrypoint, submission_id=submission_id,
            runtime_env=runtime_env(spec), entrypoint_num_cpus=spec.entrypoint_num_cpus,
            entrypoint_num_gpus=spec.entrypoint_num_gpus,
            entrypoint_memory=spec.entrypoint_memory,
            entrypoint_resources=spec.entrypoint_resources or None,
            metadata={"aigc_ray_spec": spec.name, **spec.metadata})
    return jobs, job_id


def follow(jobs, job_id: str, out=sys.stdout) -> str:
    """Stream the job's logs until it ends; its final status."""
    async def tail() -> None:
        async for lines in jobs.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    try:
        asyncio.run(tail())
    except Exception:  # the log stream closed early (head restarted): fall back to polling
        pass
    status = str(jobs.get_job_status(job_id))
    while status.split(".")[-1] not in TERMINAL:
        time.sleep(1)
        status = str(jobs.get_job_status(job_id))
    return status.split(".")[-1]


def status_line(info) -> str:
    """One line per job: id, status, start time, entrypoint (and why it failed)."""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.start_time / 1000)) \
        if info.start_time else "-"
    status = str(info.status).split(".")[-1]
    line = f"{info.submission_id or info.job_id}  {status:<9}  {started}  {info.entrypoint}"
    if status == "FAILED" and info.message:
        line += f"  ({info.message.strip().splitlines()[-1][:200]})"
    return line


def job_command(action: str, job_id: str | None, address: str | None, follow_logs: bool) -> int:
    """`aigc-ray jobs ACTION [JOB_ID]`: print what the action shows; the exit code (status: 1
    when the job FAILED or was STOPPED; logs --follow: 1 unless it SUCCEEDED)."""
    if action not in JOB_ACTIONS:
        raise ConfigError(f"aigc-ray jobs {action}: the actions are {', '.join(JOB_ACTIONS)}")
    if action != "list" and job_id is None:
        raise ConfigError(f"aigc-ray jobs {action} needs a JOB_ID (see aigc-ray jobs list)")
    jobs = client(address)
    with job_api(f"aigc-ray jobs {action}"):
        if action == "list":
            for info in sorted(jobs.list_jobs(), key=lambda i: i.start_time or 0):
                print(status_line(info))
            return 0
        if action == "status":
            info = jobs.get_job_info(job_id)
            print(status_line(info))
            return 0 if str(info.status).endswith(("SUCCEEDED", "RUNNING", "PENDING")) else 1
        if action == "stop":
            stopped = jobs.stop_job(job_id)
            print(f"job {job_id}: {'stop requested' if stopped else 'already ended'}")
            return 0
        if action == "delete":  # Ray refuses a job that has not ended: one line, exit 2
            if not jobs.delete_job(job_id):
                raise ConfigError(f"aigc-ray jobs delete: the cluster did not delete {job_id}")
            print(f"job {job_id}: deleted (its record and logs are gone from the cluster)")
            return 0
        if follow_logs:
            status = follow(jobs, job_id)
            print(f"job {job_id} {status}", file=sys.stderr)
            return 0 if status == "SUCCEEDED" else 1
        print(jobs.get_job_logs(job_id), end="")
        return 0
