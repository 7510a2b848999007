"""A model folder to use (serve, generate, eval) and the config that goes with it.

`aigc-ray train` writes its resolved config as `config.yaml` beside every checkpoint, so commands
that take a checkpoint need only its path: the saved config's relevant sections are the base and
the command line's `key=value` overrides win. A folder that aigc-ray did not write (your own HF
model) simply has no saved config, and the schema's defaults apply.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from pydantic import BaseModel

from aigc_ray.config import Config, apply_overrides, validate
from aigc_ray.errors import ConfigError
from aigc_ray.run_folder import CheckpointFolder, RunFolder


def resolve_checkpoint(checkpoint: str) -> Path:
    """The HF model folder; a run folder means its `final/`. Checked before Ray starts: the
    folder's config.json names a model_type, as transformers needs to load it."""
    path = Path(checkpoint).expanduser().resolve()
    if not path.exists():
        raise ConfigError(f"checkpoint {checkpoint} does not exist; pass a model folder such as "
                          "runs/tiny-cpu/final")
    folder, final = CheckpointFolder(path), CheckpointFolder(RunFolder(path).final)
    if not folder.model_config.is_file() and final.model_config.is_file():
        folder = final
    if not folder.model_config.is_file():
        raise ConfigError(f"checkpoint {checkpoint} is not a Hugging Face model folder (no "
                          "config.json); pass e.g. runs/tiny-cpu/final")
    try:
        model_type = json.loads(folder.model_config.read_text()).get("model_type")
    except (ValueError, AttributeError):  # not JSON, or not a JSON object
        model_type = None
    if not model_type:
        raise ConfigError(f"checkpoint {checkpoint} is not a Hugging Face model folder (its "
                          "config.json names no model_type); pass e.g. runs/tiny-cpu/final")
    if folder.sharded.is_dir():
        raise ConfigError(f"checkpoint {checkpoint} holds FSDP shards (scaling.strategy fsdp), "
                          "not whole weights; pass the run folder or its final/ folder")
    return folder.path


def known_keys(raw: dict, model: type[BaseModel] = Config) -> dict:
    """`raw` without the keys this version's schema lacks, at every depth.

    A checkpoint written by another aigc-ray version may hold keys this one does not know; they
    describe that version, not this request, so they are dropped instead of failing."""
    kept = {}
    for key, value in raw.items():
        field = model.model_fields.get(key)
        if field is None:
            continue
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            kept[key] = known_keys(value, annotation) if isinstance(value, dict) else value
        else:
            kept[key] = value
    return kept


def saved_config(folder: Path, keys: tuple[str, ...]) -> dict:
    """The saved config's `keys` (sections like "serve", or dotted values like
    "model.trust_remote_code") as a raw dict; {} when the folder has no saved config."""
    saved = CheckpointFolder(folder).config
    if not saved.is_file():
        return {}
    try:
        stored = yaml.safe_load(saved.read_text()) or {}
    except yaml.YAMLError:
        raise ConfigError(f"{saved} is not valid YAML; fix or delete it") from None
    if not isinstance(stored, dict):
        return {}
    stored = known_keys(stored)
    raw: dict = {}
    for key in keys:
        section, _, name = key.partition(".")
        value = stored.get(section)
        if name:
            if isinstance(value, dict) and name in value:
                raw.setdefault(section, {})[name] = value[name]
        elif isinstance(value, dict):
            raw[section] = value
    return raw


def merge(base: dict, extra: dict) -> dict:
    """Deep-merge `extra` into `base` (sections merge, values replace); returns `base`."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def checkpoint_config(checkpoint: str, overrides: list[str] | None, keys: tuple[str, ...],
                      command: str, extra: dict | None = None) -> tuple[Path, Config]:
    """(model folder, Config): the saved config's `keys`, then `extra` sections (same keys),
    then `key=value` overrides, which may only name `keys`. Raises a one-line ConfigError."""
    path = resolve_checkpoint(checkpoint)
    allowed = tuple(key if "." in key else f"{key}." for key in keys)
    overrides = list(overrides or [])
    for item in overrides:
        key = item.partition("=")[0]
        if "=" not in item or not key.startswith(allowed):
            forms = ", ".join(f"{k if '.' in k else k + '.key'}=value" for k in keys)
            raise ConfigError(f"{item!r}: {command} takes {forms} overrides; the rest of the "
                              "config is the checkpoint's own")
    raw = saved_config(path, keys)
    extra = extra or {}
    sections = {key.partition(".")[0] for key in keys}
    unknown = set(extra) - sections
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]} is not a {command} option; give checkpoint and "
                          f"{', '.join(keys)}")
    merge(raw, extra)
    return path, validate(apply_overrides(raw, overrides))
