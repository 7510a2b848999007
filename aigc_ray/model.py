"""Build and load models: a hub id, a local HF folder, or the built-in tiny model.

The built-in tiny model is materialized once as an ordinary HF folder (GPT-2 architecture and a
byte-level BPE tokenizer trained on the corpus), so everything downstream only sees HF folders.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path

from aigc_ray.config import Config
from aigc_ray.errors import ConfigError
from aigc_ray.run_folder import CheckpointFolder
from aigc_ray.tokenizer import TINY_CHAT_TEMPLATE, build_tokenizer, load_tokenizer

BUILTIN_PREFIX = "builtin:"

log = logging.getLogger(__name__)


def is_builtin(name_or_path: str) -> bool:
    return name_or_path.startswith(BUILTIN_PREFIX)


def builtin_model_dir(cfg: Config) -> Path:
    """Where the built-in model for this config lives: keyed by its settings and its corpus."""
    key = json.dumps(
        {"model": cfg.model.builtin.model_dump(), "block_size": cfg.data.block_size,
         "data": cfg.data.model_dump(include={"path", "format", "text_field", "prompt_field",
                                              "completion_field", "hf_split", "chat_format",
                                              "chat_fields"}),
         "chat_template": TINY_CHAT_TEMPLATE},
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cfg.run.dir.parent / ".builtin" / f"tiny-{digest}"


def build_tiny_model(cfg: Config, tokenizer):
    """A freshly initialized GPT-2-architecture model sized by `model.builtin`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tiny = cfg.model.builtin
    torch.manual_seed(cfg.train.seed)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=max(cfg.data.block_size, 128),
        n_embd=tiny.n_embd, n_layer=tiny.n_layer, n_head=tiny.n_head,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config)


def materialize_builtin(cfg: Config, texts: Iterable[str]) -> Path:
    """Create the built-in tiny model folder (if missing) from corpus `texts`; return its path."""
    folder = builtin_model_dir(cfg)
    if CheckpointFolder(folder).model_config.exists():
        return folder
    tokenizer = build_tokenizer(texts, cfg.model.builtin.vocab_size)
    model = build_tiny_model(cfg, tokenizer)
    staging = folder.with_name(folder.name + ".tmp")
    staging.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(staging)
    model.save_pretrained(staging)
    staging.rename(folder)  # atomic: a half-written folder never looks finished
    log.info("built-in tiny model (%.1fM parameters) written to %s",
             model.num_parameters() / 1e6, folder)
    return folder


def load_model(path: str, trust_remote_code: bool = False, dtype=None):
    """A causal LM from an HF folder or hub id."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                dtype=dtype)


def check_model_path(cfg: Config) -> None:
    """The model's config loads: checked before Ray starts, so a missing folder, a hub id that
    does not exist or cannot be reached (offline), or a folder that is not a model is one line
    naming model.name_or_path rather than transformers' traceback from a worker."""
    name = cfg.model.name_or_path
    if is_builtin(name):
        return
    if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().exists():
        raise ConfigError(f"model.name_or_path {name} does not exist; name a local Hugging Face "
                          "model folder, a hub id, or builtin:tiny")
    problem = model_config_problem(name, cfg.model.trust_remote_code)
    if problem:
        raise ConfigError(f"model.name_or_path {name}: {problem}; name a local Hugging Face "
                          "model folder, a hub id the network can reach, or builtin:tiny")
    if cfg.model.init == "random":
        check_tokenizer_fits(cfg)


# Files one of which a folder holding a tokenizer has.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_tokenizer_fits(cfg: Config) -> None:
    """model.init=random: the tokenizer loads and its ids fit the architecture's embedding."""
    from transformers import AutoConfig

    name, source = cfg.model.name_or_path, cfg.model.tokenizer or cfg.model.name_or_path
    trust = cfg.model.trust_remote_code
    missing = f"model.init=random needs a tokenizer and {source} has none"
    hint = "; set model.tokenizer to a folder or hub id with one"
    local = Path(source).expanduser()
    # transformers makes an empty tokenizer of a folder with a config.json and no tokenizer files.
    if local.is_dir() and not any((local / f).exists() for f in TOKENIZER_FILES):
        raise ConfigError(missing + hint)
    try:
        with hub_quiet():
            tokenizer = load_tokenizer(source, trust)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{missing} that loads ({first[:160]}){hint}") from None
    with hub_quiet():
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust)
    vocabulary = getattr(config, "vocab_size", None)
    if vocabulary is not None and len(tokenizer) > vocabulary:
        raise ConfigError(f"model.init=random: the tokenizer of {source} has {len(tokenizer):,} "
                          f"tokens, more than the {vocabulary:,} of {name}'s vocab_size; use a "
                          "tokenizer that fits it (model.tokenizer) or a config with a larger "
                          "vocab_size")


def materialize_random(cfg: Config) -> Path:
    """model.init=random: a folder holding name_or_path's architecture with fresh weights
    (seeded by train.seed) and the tokenizer, built once and keyed by the config's content, the
    tokenizer and the seed; from then on an ordinary model folder (training, the evaluation
    against its start). It takes the model's size in memory and on disk once."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    trust = cfg.model.trust_remote_code
    source = cfg.model.tokenizer or cfg.model.name_or_path
    config = AutoConfig.from_pretrained(cfg.model.name_or_path, trust_remote_code=trust)
    key = json.dumps({"config": config.to_dict(), "tokenizer": source, "seed": cfg.train.seed},
                     sort_keys=True, default=str)
    stem = Path(cfg.model.name_or_path.rstrip("/")).name or "model"
    folder = (cfg.run.dir.parent / ".random" /
              f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}")
    if CheckpointFolder(folder).model_config.exists():
        return folder
    torch.manual_seed(cfg.train.seed)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
    staging = folder.with_name(folder.name + ".tmp")
    staging.mkdir(parents=True, exist_ok=True)
    load_tokenizer(source, trust).save_pretrained(staging)
    model.save_pretrained(staging)
    staging.rename(folder)  # atomic: a half-written folder never looks finished
    log.info("%s with fresh weights (%.1fM parameters, seed %d) written to %s",
             cfg.model.name_or_path, model.num_parameters() / 1e6, cfg.train.seed, folder)
    return folder


def model_config_problem(name: str, trust_remote_code: bool) -> str | None:
    """Why the model's config does not load (its first line), or None when it does: from the
    folder or the local cache first, then from the hub where the network allows."""
    from transformers import AutoConfig

    def load(**kwargs) -> str | None:
        try:
            with hub_quiet():
                AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code, **kwargs)
        except (OSError, ValueError) as exc:
            return (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
        return None

    problem = load(local_files_only=True)
    if problem is None or Path(name).expanduser().exists():
        return problem
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "not in the local Hugging Face cache, and HF_HUB_OFFLINE is set"
    if unreachable := hub_unreachable(constants.ENDPOINT):
        return unreachable
    return load()


def hub_unreachable(endpoint: str) -> str | None:
    """Why the hub's host cannot be resolved, or None. The hub client retries a failed lookup
    for about 25 s; offline, this answers at once. Behind a proxy only the proxy resolves it."""
    import os
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY",
                                             "all_proxy", "HTTP_PROXY", "http_proxy")):
        return None
    host = urlparse(endpoint).hostname
    try:
        socket.getaddrinfo(host, 443)
    except OSError as exc:
        return f"not in the local Hugging Face cache, and {host} cannot be reached ({exc.strerror or exc})"
    return None


@contextlib.contextmanager
def hub_quiet():
    """Silence the hub client's retry warnings: the one error line says what happened."""
    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "transformers")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def resolve_model_path(cfg: Config) -> str:
    """The HF folder or hub id to load; builds the built-in tiny model on first use (needs Ray),
    and a model.init=random one (`materialize_random`)."""
    name = cfg.model.name_or_path
    if is_builtin(name):
        from aigc_ray.data.read import corpus_sample

        return str(materialize_builtin(cfg, corpus_sample(cfg, cfg.model.builtin.tokenizer_docs)))
    if cfg.model.init == "random":
        return str(materialize_random(cfg))
    local = Path(name).expanduser()
    return str(local.resolve()) if local.exists() else name


# ── inference: serving replicas, batch generation and evaluation load models this way ──────


def resolve_device(device: str) -> str:
    """`auto` → cuda when a GPU is visible, else cpu."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str):
    """`auto` → bfloat16 on GPUs that have it (else float16), float32 on CPU."""
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_for_inference(checkpoint: str, device: str = "auto", dtype: str = "auto", *,
                       trust_remote_code: bool = False, threads: float | None = None):
    """(model in eval mode on its device, tokenizer) for a HF causal-LM folder. `threads`: the
    CPUs Ray gave this actor (serve.cpus_per_replica, generate.cpus_per_actor), which become
    torch's thread count (at least 1): more threads than that only fight the other actors on
    the node. None leaves torch's default."""
    if threads is not None:
        import torch

        torch.set_num_threads(max(1, int(threads)))
    device = resolve_device(device)
    model = load_model(checkpoint, trust_remote_code, dtype=resolve_dtype(dtype, device))
    model = model.to(device).eval()
    return model, load_tokenizer(checkpoint, trust_remote_code)
