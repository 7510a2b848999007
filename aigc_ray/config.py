"""The one config schema. A YAML file plus `key=value` overrides become a validated `Config`.

Every default lives here, with the reason for it beside it. Errors a user can cause become a
`ConfigError` whose message names the dotted key and what is allowed.
"""

from __future__ import annotations

import difflib
import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from aigc_ray.errors import ConfigError

DEFAULT_CONFIG = "tiny_cpu"
# The serving API key is never written to disk: every config.yaml and tracker parameter holds
# this in its place, and serving such a config asks for the key again (see Serve.resolve_api_key).
REDACTED = "<redacted>"
API_KEY_ENV = "AIGC_RAY_API_KEY"  # where the key is read from when the config names none
# The keys each chat format reads, by their part in the format; data.chat_fields renames them.
CHAT_FIELDS = {
    "openai": {"messages": "messages", "role": "role", "content": "content"},
    "sharegpt": {"messages": "conversations", "role": "from", "content": "value"},
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output",
               "system": "system"},
}


class Section(BaseModel):
    # Unknown keys are typos far more often than intent: refuse them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BuiltinTiny(Section):
    vocab_size: int = Field(4096, ge=256)  # enough for English support text, small enough for CPU
    n_layer: int = Field(4, ge=1)  # deep enough to learn phrasing, fast on 2 cores
    n_head: int = Field(4, ge=1)
    n_embd: int = Field(192, ge=16)  # ~2.6M parameters with the defaults above
    tokenizer_docs: int = Field(20000, ge=10)  # documents read to train the BPE tokenizer


class Model(Section):
    # `builtin:tiny` needs no network; a hub id or a local HF folder works the same way.
    name_or_path: str = "builtin:tiny"
    builtin: BuiltinTiny = BuiltinTiny()
    # Never run code from a model repo unless the user says so.
    trust_remote_code: bool = False
    # pretrained: name_or_path's weights. random: only its config.json (the architecture and
    # sizes), with fresh weights seeded by train.seed: pre-training from scratch, or a model of
    # a real shape without downloading its weights.
    init: Literal["pretrained", "random"] = "pretrained"
    # With init random: where the tokenizer is when name_or_path holds no tokenizer (a folder
    # with only config.json); None: name_or_path.
    tokenizer: str | None = None

    @model_validator(mode="after")
    def _known_builtin(self) -> Model:
        if self.name_or_path.startswith("builtin:") and self.name_or_path != "builtin:tiny":
            raise ValueError(f"model.name_or_path {self.name_or_path!r} is not a built-in model "
                             "(built-in: builtin:tiny)")
        if self.tokenizer is not None and self.init != "random":
            raise ValueError("model.tokenizer goes with model.init=random (a pretrained model "
                             "brings its own tokenizer); set model.init=random or drop it")
        if self.init == "random" and self.name_or_path.startswith("builtin:"):
            raise ValueError("model.init=random: builtin:tiny is always freshly initialized; "
                             "name a folder or hub id whose config.json gives the architecture")
        return self


class Data(Section):
    # The sample corpus `aigc-ray sample-data data/sample` writes.
    path: str | list[str] = "data/sample/support.jsonl"
    format: Literal["text", "jsonl", "parquet", "hf"] = "jsonl"
    text_field: str = "text"  # the column holding documents for plain causal-LM training
    # Set both to train on prompt/completion pairs with loss on the completion only.
    prompt_field: str | None = None
    completion_field: str | None = None
    # Train on conversations rendered by the model's chat template: openai (messages), sharegpt
    # (conversations), alpaca (instruction/input/output), or auto (by each row's keys).
    chat_format: Literal["none", "auto", "openai", "sharegpt", "alpaca"] = "none"
    # Renames the keys a chat format reads, e.g. {messages: dialog, role: speaker, content: text}.
    chat_fields: dict[str, str] = {}
    # Which turns the loss learns: every assistant reply (as LLaMA-Factory and Axolotl do by
    # default), the last reply only, or every token of the rendered conversation.
    train_on: Literal["assistant", "last_assistant", "all"] = "assistant"
    # Several examples per block, each attending only to itself: no compute spent on padding.
    packing: bool = False
    hf_split: str = "train"  # which split of a `datasets` name or save_to_disk folder to read
    block_size: int = Field(512, ge=8)  # tokens per training sequence; GPT-2 allows up to 1024
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)  # held out by document hash
    strict: bool = False  # fail on the first bad row instead of skipping and counting it
    tokenize_batch_size: int = Field(256, ge=1)  # documents per tokenizer call
    tokenizer_actors: int = Field(1, ge=1)  # one tokenizer actor per spare core is plenty
    # Logical CPUs per read task and tokenizer actor: light work that interleaves with training,
    # so a fraction leaves whole CPUs to the trainers (with 0 spare CPUs, reads would never run).
    cpus_per_task: float = Field(0.25, gt=0)
    # Bytes of tokenized training blocks kept in the object store so later epochs re-read them
    # instead of tokenizing again. None: a quarter of the object store; 0: always stream.
    cache_max_bytes: int | None = Field(None, ge=0)
    # Training never follows file order (a corpus sorted by topic would train on the last topic
    # and forget the first): true reshuffles every epoch from train.seed and the epoch number
    # (the cached split permutes its blocks; a streamed one randomizes block order and mixes
    # through a local buffer); global: a full Ray Data random_shuffle each epoch (all-to-all,
    # slower); false: file order.
    shuffle: bool | Literal["global"] = True

    @property
    def supervised(self) -> bool:
        """True when training on prompt/completion pairs (loss on the completion only)."""
        return self.prompt_field is not None

    @property
    def chat(self) -> bool:
        """True when training on conversations rendered by the chat template."""
        return self.chat_format != "none"

    @property
    def paths(self) -> list[str]:
        return [self.path] if isinstance(self.path, str) else list(self.path)

    @model_validator(mode="after")
    def _fields_agree(self) -> Data:
        if (self.prompt_field is None) != (self.completion_field is None):
            raise ValueError("data.prompt_field and data.completion_field must be set together")
        if self.format == "text" and self.supervised:
            raise ValueError(
                "data.format text has no prompt/completion fields: for plain text use the "
                "tiny_text config, or add data.prompt_field=null data.completion_field=null")
        if self.chat and self.format == "text":
            raise ValueError(f"data.chat_format {self.chat_format} needs jsonl, parquet or hf "
                             "rows; data.format text holds plain lines")
        if self.chat and self.supervised:
            raise ValueError(f"data.chat_format {self.chat_format} reads conversations, not "
                             "prompt/completion fields: set data.prompt_field=null "
                             "data.completion_field=null, or data.chat_format=none")
        known = {key for fields in CHAT_FIELDS.values() for key in fields}
        if unknown := sorted(set(self.chat_fields) - known):
            raise ValueError(f"data.chat_fields has unknown key(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        if self.train_on != "assistant" and not self.chat:
            raise ValueError("data.train_on applies to conversations; set data.chat_format "
                             "(openai, sharegpt, alpaca or auto)")
        if isinstance(self.path, list) and not self.path:
            raise ValueError("data.path must name at least one file, got []")
        return self


class Lora(Section):
    enabled: bool = False
    r: int = Field(8, ge=1)  # rank 8 is the common starting point (LoRA paper, peft docs)
    alpha: int = Field(16, ge=1)  # alpha = 2r keeps the update scale familiar
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | None = None  # None: peft's default for the architecture


class Train(Section):
    max_steps: int | None = Field(None, ge=1)  # when set, ends the run (wins over epochs)
    epochs: int = Field(1, ge=1)  # passes over the training split when max_steps is unset
    batch_size: int = Field(8, ge=1)  # sequences per worker per micro-step
    grad_accum_steps: int = Field(1, ge=1)  # micro-steps per optimizer step
    lr: float = Field(3e-4, gt=0)  # peak learning rate; 3e-4 is a safe AdamW default
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)  # decay to 10% of peak, as in nanoGPT
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(20, ge=0)  # linear warmup avoids early AdamW blow-ups
    weight_decay: float = Field(0.1, ge=0.0)  # not applied to biases and norms
    max_grad_norm: float = Field(1.0, gt=0)  # clip to keep rare large batches harmless
    seed: int = 42
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    gradient_checkpointing: bool = False  # trade compute for memory on big models
    freeze_layers: int = Field(0, ge=0)  # freeze embeddings and the bottom N blocks when > 0
    lora: Lora = Lora()
    eval_every: int = Field(50, ge=1)  # optimizer steps between validation passes
    eval_batches: int | None = Field(None, ge=1)  # cap per worker; None: the whole split
    log_every: int = Field(10, ge=1)  # optimizer steps between progress lines
    keep_checkpoints: int = Field(2, ge=1)  # best K by validation loss
    early_stopping_patience: int | None = Field(None, ge=1)  # evals without improvement
    # Replies to these are generated at each evaluation and written to the log. None: two
    # prompts from the run's own validation split (its data, not the sample corpus's); []: none.
    sample_prompts: list[str] | None = None
    # The next-token loss: plain (the model's logits, then cross-entropy), chunked (from the
    # last hidden states a slice of target tokens at a time, gradients in the same pass: no full
    # logits tensor, the same loss and gradients), or auto: chunked from a 65,536-token
    # vocabulary up (Llama 3, Qwen, Gemma), where the fp32 logits are the step's largest tensor.
    loss_impl: Literal["auto", "plain", "chunked"] = "auto"
    # torch.compile the model: faster steps on a GPU once compiled (a minute or two at start).
    compile: bool = False
    # Batches collated and pinned ahead of the step, so the GPU never waits for the next one.
    prefetch_batches: int = Field(4, ge=1)
    # torch.profiler over this many optimizer steps (0: off) from step profile_from, on every
    # rank: profile/rank-N.trace.json.gz and rank-N.txt (ms a step, gpu_busy, the top ops).
    profile_steps: int = Field(0, ge=0)
    profile_from: int = Field(10, ge=1)  # the first steps pay for start-up and compilation

    @model_validator(mode="after")
    def _profile_window_inside_the_run(self) -> Train:
        if self.profile_steps and self.max_steps and self.profile_from > self.max_steps:
            raise ValueError(f"train.profile_from={self.profile_from} is past train.max_steps="
                             f"{self.max_steps}: nothing would be profiled; lower "
                             "train.profile_from")
        return self


class Scaling(Section):
    # Data-parallel training workers (the most, with elastic). The global batch is
    # train.batch_size × train.grad_accum_steps × num_workers, kept when fewer workers run.
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(1, gt=0)  # used only when use_gpu is true
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_failures: int = Field(0, ge=-1)  # worker-group restarts; -1 retries forever
    # Spot instances. On a node's preemption notice every worker saves a checkpoint at the
    # next step boundary and Ray Train restarts them from it once the node is reclaimed; these
    # restarts do not count against max_failures. -1: after every preemption; 0: fail instead.
    max_preemptions: int = Field(-1, ge=-1)
    # true: (re)start with as many workers as the cluster can place right now, from
    # min_workers to num_workers, instead of waiting for all num_workers (after a preemption,
    # say), and grow back when nodes return (Ray checks every elastic_check_s; growing
    # restarts the workers from the latest checkpoint). Gradient accumulation makes up for
    # missing workers, so the global batch stays the same.
    elastic: bool = False
    min_workers: int = Field(1, ge=1)
    elastic_check_s: float = Field(60.0, gt=0)
    # bf16 dense TFLOPS of one accelerator, for `mfu`; None: looked up by the GPU's name.
    peak_tflops: float | None = Field(None, gt=0)
    # ddp: a whole copy of the model, gradients and optimizer state per worker (fastest while it
    # fits one device); fsdp: FSDP2 shards all three across the workers (~1/N each).
    strategy: Literal["ddp", "fsdp"] = "ddp"
    # fsdp on GPUs: keep parameter shards and optimizer state in host memory between uses.
    cpu_offload: bool = False

    @model_validator(mode="after")
    def _min_workers_needs_elastic(self) -> Scaling:
        if self.min_workers > self.num_workers:
            raise ValueError(f"scaling.min_workers={self.min_workers} is more than "
                             f"scaling.num_workers={self.num_workers}; lower it")
        if self.min_workers != 1 and not self.elastic:
            raise ValueError("scaling.min_workers applies only with scaling.elastic=true; set "
                             "both, or leave min_workers out")
        return self

    @model_validator(mode="after")
    def _offload_needs_fsdp_on_gpu(self) -> Scaling:
        if self.cpu_offload and (self.strategy != "fsdp" or not self.use_gpu):
            raise ValueError("scaling.cpu_offload moves FSDP shards from the GPU to host memory; "
                             "it needs scaling.strategy=fsdp and scaling.use_gpu=true (or set "
                             "scaling.cpu_offload=false)")
        return self


SEARCH_DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")


class Asha(Section):
    # Steps every trial runs before ASHA may stop it; None: the first evaluation
    # (train.eval_every), the earliest point with a validation loss to compare.
    grace_period: int | None = Field(None, ge=1)
    reduction_factor: float = Field(2.0, gt=1)  # keep the better half at each rung: gentle for few trials


# Keys PBT cannot change mid-run: they decide which parameters exist or train, so a trial
# continuing from another's checkpoint must keep the donor's values.
PBT_FIXED_PREFIXES = ("model.", "train.lora.", "train.freeze_layers", "scaling.strategy")


class Pbt(Section):
    # Training steps between perturbations; None: train.eval_every (every evaluation is a chance
    # to move the population). Each exploit restarts a trial's workers, so raise it when
    # starts are slow. Must be a multiple of train.eval_every: trials report at evaluations.
    perturbation_interval: int | None = Field(None, ge=1)
    # The worse quarter copies the better quarter (Ray's default and the PBT paper's).
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)
    # Search-space keys PBT changes when a trial exploits another; None: every key of
    # tune.search_space it can change mid-run (not model.*, train.lora.*, train.freeze_layers).
    mutate: list[str] | None = None
    # Each mutated value is drawn again from its distribution with this probability; otherwise
    # a number is multiplied by one of perturbation_factors and a choice moves to a neighbour
    # (Ray's defaults). Values stay inside the declared bounds.
    resample_probability: float = Field(0.25, ge=0.0, le=1.0)
    perturbation_factors: list[float] = Field([1.2, 0.8], min_length=1)
    # false: a trial is compared with the others' latest results when it reaches a perturbation
    # (no one waits). true: every trial waits there for the slowest and all are compared at
    # the same step, at the price of restarting each trial's workers at every perturbation.
    synch: bool = False


class Tune(Section):
    num_samples: int = Field(4, ge=1)  # random draws; with grid keys, repeats of the whole grid
    metric: Literal["val_loss", "val_perplexity", "loss"] = "val_loss"
    mode: Literal["min", "max"] = "min"
    # fifo: every trial runs to its end; pbt: the worse trials continue from the better ones'
    # checkpoints with perturbed values (settings under tune.pbt)
    scheduler: Literal["asha", "fifo", "pbt"] = "asha"
    asha: Asha = Asha()
    pbt: Pbt = Pbt()
    search_alg: Literal["random", "optuna"] = "random"
    seed: int = 0  # the sampler's seed: the same config draws the same trials
    # None: as many trials at once as the cluster's CPUs (and GPUs) fit.
    max_concurrent_trials: int | None = Field(None, ge=1)
    # Dotted config key → one distribution, e.g. train.lr: {loguniform: [1.0e-4, 3.0e-3]}.
    search_space: dict[str, dict[str, Any]] = {}


class Autoscaling(Section):
    min_replicas: int = Field(1, ge=0)  # one warm replica: no cold start on the first request
    max_replicas: int = Field(2, ge=1)  # two fit a 2-core laptop; raise it on a cluster
    initial_replicas: int | None = Field(None, ge=0)  # None: start at min_replicas
    # Requests in flight per replica that Serve aims for: one full batch keeps a replica busy.
    target_ongoing_requests: float = Field(8, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)  # Ray's default: sustained load, not a spike
    downscale_delay_s: float = Field(600.0, ge=0)  # Ray's default: keep warm replicas a while
    look_back_period_s: float = Field(30.0, gt=0)  # Ray's default window for averaging load

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"serve.autoscaling.min_replicas ({self.min_replicas}) must be <= "
                             f"serve.autoscaling.max_replicas ({self.max_replicas})")
        initial = self.initial_replicas
        if initial is not None and not self.min_replicas <= initial <= self.max_replicas:
            raise ValueError(f"serve.autoscaling.initial_replicas ({initial}) must lie between "
                             f"min_replicas ({self.min_replicas}) and max_replicas "
                             f"({self.max_replicas})")
        return self


class Serve(Section):
    host: str = "127.0.0.1"  # loopback unless the user opens it up (0.0.0.0 on a cluster)
    port: int = Field(8000, ge=1, le=65535)  # Ray Serve's usual port
    app_name: str = Field("aigc-ray", min_length=1)  # the Serve application's name
    route_prefix: str = Field("/", pattern=r"^/")  # the API lives at {route_prefix}v1/...
    model_name: str | None = None  # the id clients send; None: the checkpoint's run/folder name
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when a GPU is visible
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 GPU, fp32 CPU
    cpus_per_replica: float = Field(1.0, gt=0)  # also the replica's torch threads (at least 1)
    gpus_per_replica: float = Field(1.0, gt=0)  # used only when the device is cuda
    max_batch_size: int = Field(16, ge=1)  # rows per forward pass; CPU steps cost ~flat to 16
    batch_wait_timeout_s: float = Field(0.005, ge=0)  # what a lone request waits for company
    # Requests join a running batch at its next step; false: they wait for it to finish.
    continuous_batching: bool = True
    # On a GPU: fixed decode slots, each step a CUDA graph replay. Off until its GPU test has
    # passed on a device (token-equal to the padded engine in bf16); see README, CUDA graphs.
    cuda_graphs: bool = False
    autoscaling: Autoscaling = Autoscaling()
    # In flight per replica: a running batch plus a full one waiting, so no step idles.
    max_ongoing_requests: int = Field(32, ge=1)
    # Waiting at the ingress for a free replica; past it a request gets 503 at once (-1: no cap).
    max_queued_requests: int = Field(64, ge=-1)
    retry_after_s: int = Field(1, ge=0)  # the Retry-After a 503 carries
    default_max_tokens: int = Field(64, ge=1)  # when a request names no max_tokens
    max_tokens: int = Field(1024, ge=1)  # the most one request may ask for: bounds its decode time
    max_body_bytes: int = Field(1_000_000, ge=1024)  # larger request bodies get 413
    # Requests must carry `Authorization: Bearer <key>` when a key is set: serve.api_key, else
    # the file serve.api_key_file names (read when serving), else AIGC_RAY_API_KEY. The file or
    # the variable is the way to pass it: a command-line value shows in `ps`. The key is never
    # written to disk (config.yaml and trackers hold <redacted>), and deployments are given only
    # its SHA-256, since their arguments show on the dashboard.
    api_key: str | None = None
    api_key_file: str | None = None
    ingress_replicas: int = Field(1, ge=1)  # the HTTP layer is light: one keeps up with many models
    health_check_period_s: float = Field(10.0, gt=0)  # Ray's default
    health_check_timeout_s: float = Field(30.0, gt=0)  # Ray's default

    @model_validator(mode="after")
    def _consistent(self) -> Serve:
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(f"serve.default_max_tokens ({self.default_max_tokens}) must be <= "
                             f"serve.max_tokens ({self.max_tokens})")
        if self.api_key and self.api_key != REDACTED and self.api_key_file is not None:
            raise ValueError("serve.api_key and serve.api_key_file are both set; keep one "
                             "(serve.api_key_file: the key on the command line shows in `ps`)")
        return self

    def resolve_api_key(self) -> str | None:
        """The key requests must carry: serve.api_key, else the contents of serve.api_key_file,
        else AIGC_RAY_API_KEY; None: no key is asked for. A key file that is missing, unreadable
        or empty, and a saved config whose key was redacted and is not given again, are a
        one-line ConfigError (the CLI calls this before Ray starts)."""
        if self.api_key and self.api_key != REDACTED:
            return self.api_key
        if self.api_key_file is not None:
            return read_key_file(self.api_key_file)
        if key := os.environ.get(API_KEY_ENV):
            return key
        if self.api_key == REDACTED:
            # Serving it open would silently drop the protection the user asked for.
            raise ConfigError(f"this config was saved with serve.api_key set, and the key is never "
                              f"written to disk: pass it again with {API_KEY_ENV}=KEY or "
                              "serve.api_key_file=FILE (or serve.api_key=null to serve without one)")
        return None


def read_key_file(path: str) -> str:
    """The key a file holds, without the line end `echo KEY > FILE` adds."""
    where = f"serve.api_key_file {path}"
    try:
        key = Path(path).expanduser().read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise ConfigError(f"{where} does not exist; write the key to it, or pass the key with "
                          f"{API_KEY_ENV}") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(f"{where} cannot be read ({reason}); make it a readable text file "
                          "holding the key") from None
    if not key:
        raise ConfigError(f"{where} is empty; write the key to it") from None
    return key


class Generate(Section):
    """`aigc-ray generate`: batch generation over a Ray Data dataset of prompts."""

    prompt_field: str = "prompt"  # the jsonl/parquet column holding prompts (text: each line)
    id_field: str = "id"  # copied to every output row; a row without one gets "file:line"
    input_format: Literal["auto", "jsonl", "parquet", "text"] = "auto"  # auto: by file extension
    output_format: Literal["parquet", "jsonl"] = "parquet"
    max_tokens: int = Field(64, ge=1)  # generated per prompt at most
    temperature: float = Field(0.0, ge=0)  # 0: greedy and reproducible; raise it for variety
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] = []  # strings that end a completion (not included in it)
    seed: int = 0  # with temperature > 0 a row's sample depends only on the seed and its id
    # The serving API's sampling controls, with the same definitions (see README, Serving).
    top_k: int = Field(0, ge=0)  # 0: every token
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0)
    min_tokens: int = Field(0, ge=0)  # EOS and stop strings cannot end a completion earlier
    ignore_eos: bool = False  # only max_tokens or a stop string ends a completion
    batch_size: int = Field(16, ge=1)  # prompts decoded together; CPU steps cost ~flat to 16
    # On a GPU: fixed decode slots, each step a CUDA graph replay. Off until its GPU test has
    # passed on a device (token-equal to the padded engine in bf16); see README, CUDA graphs.
    cuda_graphs: bool = False
    concurrency: int = Field(1, ge=1)  # model actors (replicas of the model) in the pool
    cpus_per_actor: float = Field(1.0, gt=0)  # also the actor's torch threads (at least 1)
    gpus_per_actor: float = Field(1.0, gt=0)  # used only when the device is cuda
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when the cluster has GPUs
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 GPU, fp32 CPU
    strict: bool = False  # fail on the first bad input row instead of skipping and counting it


class Eval(Section):
    """`aigc-ray eval` and the evaluation at the end of `aigc-ray train`."""

    after_training: bool = True  # `aigc-ray train` compares final/ with its starting model
    # Prompts generated from for ROUGE-L and BLEU (generation is the slow part); None: all.
    # Perplexity always covers every row.
    generate_rows: int | None = Field(200, ge=1)
    max_tokens: int = Field(64, ge=1)  # greedy tokens generated per prompt
    batch_size: int = Field(8, ge=1)  # sequences per scoring forward pass
    # `--harness`: prompts per HTTP request (lm-eval's batch_size): a request's HTTP and Serve
    # cost (~12 ms of CPU, measured) is paid once for all of them; 8 ran 3.2x faster than 1.
    harness_batch_size: int = Field(8, ge=1, le=64)  # 64: a request's most choices
    # Requests lm-eval keeps in flight (num_concurrent). None: enough prompts to fill the
    # replica's batch twice (one decoding, one waiting): 2 * serve.max_batch_size / the above.
    harness_concurrency: int | None = Field(None, ge=1)


class Run(Section):
    output_dir: str = "runs"  # on a multi-node cluster, shared storage every node can read
    name: str = Field("default", min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    # Ray forwards every worker's output to the console; our progress lines say what matters,
    # and Ray's logs stay in its session folder (/tmp/ray/session_latest/logs).
    ray_logs: bool = False
    # Experiment trackers each training run logs to (rank 0): metrics, config, samples, the loss
    # curve and the final evaluation. None by default: metrics.jsonl and the plots need nothing.
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = []
    # MLflow's tracking URI; None: a SQLite store beside the runs ({output_dir}/mlflow.db). A
    # folder (or file: URI) holds a SQLite store too, {folder}/mlflow.db (MLflow 3 refuses a
    # file store), and a path ending in .db is that SQLite file; either becomes an absolute
    # sqlite:/// URI here, so workers in other working directories log to the same store.
    mlflow_uri: str | None = None
    # The MLflow experiment / W&B project (and W&B group) runs are logged under; None: aigc-ray.
    # `aigc-ray tune` sets it to the search's name, so its trials are grouped.
    experiment: str | None = None

    @field_validator("name")
    @classmethod
    def _inside_output_dir(cls, name: str) -> str:
        # `..` would put the run (and the `final/` its export replaces) outside run.output_dir.
        if name in (".", ".."):
            raise ValueError(f"run.name {name!r} would not be a folder inside run.output_dir; "
                             "name the run, e.g. run.name=tiny-cpu")
        return name

    @field_validator("mlflow_uri")
    @classmethod
    def _folder_holds_a_sqlite_store(cls, uri: str | None) -> str | None:
        if not uri or uri.startswith("databricks"):
            return uri
        if "://" in uri and not uri.startswith("file:"):
            return uri  # a tracking server or a database: MLflow's to reach
        path = Path(uri.removeprefix("file://").removeprefix("file:")).expanduser().resolve()
        return f"sqlite:///{path if path.suffix == '.db' else path / 'mlflow.db'}"

    @property
    def dir(self) -> Path:
        """The run folder: `{output_dir}/{name}`."""
        return Path(self.output_dir).expanduser().resolve() / self.name


class Config(Section):
    model: Model = Model()
    data: Data = Data()
    train: Train = Train()
    scaling: Scaling = Scaling()
    tune: Tune = Tune()
    serve: Serve = Serve()
    generate: Generate = Generate()
    eval: Eval = Eval()
    run: Run = Run()

    @model_validator(mode="after")
    def _search_space_fits(self) -> Config:
        for key, spec in self.tune.search_space.items():
            searchable = [k for k in leaf_keys() if not k.startswith("tune.")]
            if key not in searchable:
                close = difflib.get_close_matches(key, searchable, n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                raise ValueError(f"tune.search_space key {key} is not a config value to search "
                                 f"(dotted keys such as train.lr or train.lora.r){hint}")
            for value in check_distribution(key, spec):  # bounds and choices must be valid
                try:
                    patched = self.model_dump(exclude={"tune"})
                    set_key(patched, key.split("."), value)
                    Config.model_validate(patched)
                except ValidationError as exc:
                    raise ValueError(f"tune.search_space {key}: {describe_error(exc.errors()[0])}"
                                     ) from None
        if self.tune.scheduler == "pbt":
            self._pbt_fits()
        return self

    def _pbt_fits(self) -> None:
        pbt, space = self.tune.pbt, self.tune.search_space
        interval = pbt.perturbation_interval or self.train.eval_every
        if interval % self.train.eval_every:
            raise ValueError(f"tune.pbt.perturbation_interval must be a multiple of "
                             f"train.eval_every ({self.train.eval_every}): trials report at "
                             f"evaluations; got {interval}")
        for key in pbt.mutate or []:
            if key not in space:
                raise ValueError(f"tune.pbt.mutate key {key} is not in tune.search_space "
                                 f"({', '.join(space) or 'empty'}); PBT mutates searched keys")
            if key.startswith(PBT_FIXED_PREFIXES):
                raise ValueError(f"tune.pbt.mutate key {key} cannot change mid-run (it decides "
                                 "which parameters exist or train); leave it out of tune.pbt.mutate")
        if not pbt_mutations(self.tune):
            raise ValueError("tune.scheduler pbt needs a key to mutate: search a key such as "
                             "train.lr (model.*, train.lora.* and train.freeze_layers cannot "
                             "change mid-run)")
        if self.tune.search_alg != "random":
            raise ValueError("tune.scheduler pbt takes no search algorithm (Ray's PBT draws and "
                             "perturbs the values itself); set tune.search_alg=random")


def leaf_keys(model: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """Every dotted key that names a value (not a section): train.lr, train.lora.r, ..."""
    keys = []
    for name, field in (model or Config).model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += leaf_keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def check_distribution(key: str, spec: dict) -> list:
    """The values a distribution's bounds or choices name, or a ConfigError-worthy ValueError."""
    where = f"tune.search_space {key}"
    if len(spec) != 1 or next(iter(spec)) not in SEARCH_DISTRIBUTIONS:
        raise ValueError(f"{where} must be one of {{{', '.join(SEARCH_DISTRIBUTIONS)}: ...}}, "
                         f"got {spec!r}")
    (kind, args), = spec.items()
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ValueError(f"{where} {kind} needs a non-empty list of values, got {args!r}")
        return args
    numbers = isinstance(args, list) and len(args) == 2 and all(
        isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
    if not numbers or not args[0] < args[1]:
        raise ValueError(f"{where} {kind} needs [low, high] with low < high, got {args!r}")
    if kind == "loguniform" and args[0] <= 0:
        raise ValueError(f"{where} loguniform needs low > 0, got {args[0]}")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise ValueError(f"{where} randint needs whole numbers, got {args!r}")
    return args


def pbt_mutations(tune: Tune) -> list[str]:
    """The search-space keys PBT mutates: `tune.pbt.mutate`, or every searched key that can
    change mid-run."""
    if tune.pbt.mutate is not None:
        return list(tune.pbt.mutate)
    return [key for key in tune.search_space if not key.startswith(PBT_FIXED_PREFIXES)]


def set_key(raw: dict, keys: list[str], value) -> None:
    """Set a value in a raw config dict by its key path, creating sections on the way."""
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value


def shipped_configs() -> dict[str, Path]:
    """The YAML files shipped in `aigc_ray/configs/`, by name without `.yaml`."""
    folder = resources.files("aigc_ray") / "configs"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def resolve_config_path(name_or_path: str | None) -> Path:
    """A file path, or the name of a shipped config (`tiny_cpu`); None means the default."""
    name_or_path = name_or_path or DEFAULT_CONFIG
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = shipped_configs()
    if name_or_path in shipped:
        return shipped[name_or_path]
    raise ConfigError(
        f"config {name_or_path!r} is neither a file nor a shipped config "
        f"(shipped: {', '.join(sorted(shipped))})"
    )


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """`train.lr=3e-4` → (["train", "lr"], 0.0003); values are read as YAML scalars/lists."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} must look like section.key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key.split("."), value))
    return parsed


def split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    """`[CONFIG] [key=value ...]` (the arguments of train, tune, config, data) → (config or None,
    overrides); only the first argument may name a config."""
    name, overrides = (args[0], args[1:]) if args and "=" not in args[0] else (None, args)
    bad = [item for item in overrides if "=" not in item]
    if bad:
        raise ConfigError(f"{bad[0]!r} is not key=value; only the first argument may name a config")
    return name, overrides


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Patch a raw config dict with `key=value` overrides."""
    for keys, value in parse_overrides(overrides):
        node = raw
        for depth, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                dotted = ".".join(keys[: depth + 1])
                raise ConfigError(f"{dotted} is a value, not a section; cannot set {'.'.join(keys)}")
            node = child
        node[keys[-1]] = value
    return raw


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def describe_error(error: dict) -> str:
    loc = tuple(error["loc"])
    key = ".".join(str(p) for p in loc) or "config"
    kind, ctx, got = error["type"], error.get("ctx", {}), error.get("input")
    if kind == "extra_forbidden":
        known = _known_keys(Config, loc)
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"; did you mean {'.'.join([*map(str, loc[:-1]), close[0]])}?" if close else ""
        return f"{key} is not a known key (known here: {', '.join(known)}){hint}"
    if kind == "missing":
        return f"{key} is required"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    bounds = {"greater_than": "> {gt}", "greater_than_equal": ">= {ge}",
              "less_than": "< {lt}", "less_than_equal": "<= {le}"}
    if kind in bounds:
        what = "must be " + bounds[kind].format(**ctx)
    elif kind == "literal_error":
        what = f"must be one of {ctx.get('expected')}"
    elif kind in ("int_parsing", "int_type", "int_from_float"):
        what = "must be a whole number"
    elif kind in ("float_parsing", "float_type"):
        what = "must be a number"
    elif kind in ("bool_parsing", "bool_type"):
        what = "must be true or false"
    elif kind == "model_type":
        what = "must be a section (key: value pairs)"
    else:
        what = error["msg"][0].lower() + error["msg"][1:]
    return f"{key} {what}, got {got!r}"


def validate(raw: dict) -> Config:
    """Build a `Config` from a raw dict, or raise a one-line `ConfigError`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise ConfigError(describe_error(errors[0]) + more) from None


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (a file or a shipped name; None → tiny_cpu) and apply overrides."""
    config_path = resolve_config_path(path)
    try:
        raw = yaml.safe_load(config_path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{config_path}{where} is not valid YAML: {exc.__class__.__name__}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{config_path} must hold a mapping of sections, got {type(raw).__name__}")
    return validate(apply_overrides(raw, overrides or []))


def redacted_dump(cfg: Config, mode: Literal["python", "json"] = "python") -> dict:
    """`cfg.model_dump()` with the API key replaced by REDACTED: what may be written to disk, a
    tracker or a log."""
    raw = cfg.model_dump(mode=mode)
    if raw["serve"]["api_key"] is not None:
        raw["serve"]["api_key"] = REDACTED
    return raw


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML, in schema order, the API key redacted."""
    return yaml.safe_dump(redacted_dump(cfg), sort_keys=False)
