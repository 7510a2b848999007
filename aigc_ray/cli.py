"""`aigc-ray <command> ...`: one table, COMMANDS, gives each command its help, the function that
adds its arguments and the plain function that runs it. An error a user can fix (a UserError)
prints as one line and exits 2; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import shlex
import signal
import socket
import sys
import threading
from typing import Callable, NamedTuple

from aigc_ray.config import (
    DEFAULT_CONFIG,
    Config,
    load_config,
    shipped_configs,
    split_config_args,
    to_yaml,
)
from aigc_ray.errors import ConfigError, user_error
from aigc_ray.jobs import (
    JOB_ACTIONS,
    follow,
    job_command,
    load_job_spec,
    submit,
)

CONFIG_HELP = (f"CONFIG is a YAML file or a shipped config name ({', '.join(sorted(shipped_configs()))}; "
               f"default {DEFAULT_CONFIG}); key=value pairs override it, e.g. train.lr=3e-4 "
               "scaling.num_workers=4")
ADDRESS_HELP = ("the Ray dashboard (job API) address, e.g. http://HEAD:8265; it wins over "
                "RAY_ADDRESS. Default: RAY_API_SERVER_ADDRESS or RAY_ADDRESS, else the head "
                "`ray start --head` started on this machine")


# ── train, config, data, tune: [CONFIG] [key=value ...] ─────────────────────────────────────


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("args", nargs="*", metavar="[CONFIG] [key=value ...]")


def _config(ns: argparse.Namespace) -> Config:
    return load_config(*split_config_args(ns.args))


def cmd_train(ns: argparse.Namespace) -> int:
    from aigc_ray.evaluate import evaluate_after_training, format_report
    from aigc_ray.train.driver import run_train

    cfg = _config(ns)
    with SignalWatch() as signals:
        try:
            summary = run_train(cfg)
        except SystemExit as exc:
            if not signals.stop_received():  # a bug that called sys.exit: show where
                raise RuntimeError(f"training ended by SystemExit({exc.code!r}) though no "
                                   "Ctrl-C or SIGTERM arrived") from exc
            # Ctrl-C or SIGTERM: Ray Train's SIGINT handler aborts the run and leaves by
            # SystemExit (code 1 once it passes through a ray.get). The checkpoints stay.
            again = shlex.join(["aigc-ray", "train", *ns.args])
            print(f"training stopped; resume it from its last checkpoint with: {again}",
                  file=sys.stderr)
            return 130
    summary.evaluation = evaluate_after_training(cfg, summary)  # eval.after_training
    for sample in summary.samples:
        print(f"sample reply  {sample['prompt']!r}\n           → {sample['reply']!r}")
    if summary.evaluation:
        print(format_report(summary.evaluation))
    print(summary.line())
    return 0


class SignalWatch:
    """Whether Ctrl-C or SIGTERM reached this process while watched, whatever Python handler ran
    for it: Ray Train replaces the SIGINT handler during `fit`, so a handler of ours would miss
    it, but Python's C-level handler writes every signal's number to the wakeup fd first. Only
    the main thread receives signals (and only there does Ray Train install its handler)."""

    def __enter__(self) -> SignalWatch:
        self.numbers = bytearray()
        self.reader = self.writer = None
        if threading.current_thread() is threading.main_thread():
            self.reader, self.writer = socket.socketpair()
            self.reader.setblocking(False)
            self.writer.setblocking(False)
            self.previous = signal.set_wakeup_fd(self.writer.fileno(), warn_on_full_buffer=False)
        return self

    def stop_received(self) -> bool:
        while self.reader is not None:
            try:
                self.numbers += self.reader.recv(4096)
            except BlockingIOError:  # nothing more to read
                break
        return bool({signal.SIGINT, signal.SIGTERM} & set(self.numbers))

    def __exit__(self, *exc_info) -> None:
        if self.reader is not None:
            signal.set_wakeup_fd(self.previous)
            self.reader.close()
            self.writer.close()


def cmd_config(ns: argparse.Namespace) -> int:
    print(to_yaml(_config(ns)), end="")
    return 0


def cmd_data(ns: argparse.Namespace) -> int:
    from aigc_ray.cluster import start_ray
    from aigc_ray.data.pipeline import check_config, corpus_statistics, format_statistics
    from aigc_ray.model import check_model_path, resolve_model_path

    cfg = _config(ns)
    files = check_config(cfg)  # before Ray starts
    check_model_path(cfg)
    start_ray(ray_logs=cfg.run.ray_logs)
    # The tokenizer is all this needs: a model.init=random run's is where model.tokenizer says.
    tokenizer_path = (cfg.model.tokenizer or cfg.model.name_or_path
                      if cfg.model.init == "random" else resolve_model_path(cfg))
    print(format_statistics(cfg, corpus_statistics(cfg, tokenizer_path), files))
    return 0


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted search in the run folder")


def cmd_tune(ns: argparse.Namespace) -> int:
    from aigc_ray.tune import run_tune

    summary = run_tune(_config(ns), resume=ns.resume)
    if summary.unfinished:
        again = " ".join(["aigc-ray tune", *ns.args, "--resume"])
        print(f"search interrupted with {summary.unfinished} trial(s) unfinished; continue it "
              f"with: {again}", file=sys.stderr)
        return 130
    print(summary.table())
    if summary.best is None:
        print(f"error: {summary.line()}", file=sys.stderr)
        return 1
    print(summary.line())
    return 0


# ── sample-data DIR ──────────────────────────────────────────────────────────────────────────


def add_sample_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR")
    parser.add_argument("--pairs", type=int, default=4000, help="pairs, and as many conversations (4000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")


def cmd_sample_data(ns: argparse.Namespace) -> int:
    from aigc_ray.data.sample import write_sample_corpus

    written = write_sample_corpus(ns.dir, num_pairs=ns.pairs, seed=ns.seed)
    print(f"wrote {written['pairs']} support question/answer pairs to {written['jsonl']} "
          f"and {written['text']}, as many multi-turn conversations to {written['chat']}, and "
          f"three lm-evaluation-harness tasks on support questions: "
          f"{written['harness']['choice']} (multiple choice), {written['harness']['text']} "
          f"(perplexity) and {written['harness']['reply']} (the greedy reply)")
    return 0


# ── serve, generate, eval: CHECKPOINT [key=value ...] ───────────────────────────────────────
# The overrides default to None so that a missing CHECKPOINT is the only argument argparse
# names as required (it lists a `*` positional without a default too).


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT")
    parser.add_argument("overrides", nargs="*", default=None, metavar="serve.key=value")
    parser.add_argument("--build", metavar="FILE",
                        help="write a Ray Serve config file (serve deploy / KubeRay) and exit")
    parser.add_argument("--once", metavar="PROMPT",
                        help="deploy, answer PROMPT through the HTTP API, print it, shut down")


def cmd_serve(ns: argparse.Namespace) -> int:
    from aigc_ray.serve import load_serve_config, run_serve, write_serve_config

    path, cfg = load_serve_config(ns.checkpoint, ns.overrides)  # before Ray starts
    if ns.build:
        print(f"wrote {write_serve_config(path, cfg, ns.build)} "
              f"(serve deploy {ns.build}, or a RayService's serveConfigV2)")
        return 0
    cfg.serve.resolve_api_key()  # a key file that cannot be read fails before Ray starts
    reply = run_serve(path, cfg, once=ns.once)
    if reply is not None:
        choice = reply["choices"][0]
        print(f"prompt {ns.once!r}\n     → {choice['text']!r}  ({choice['finish_reason']}, "
              f"{reply['usage']['completion_tokens']} tokens from {reply['model']})")
    return 0


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="a Hugging Face model folder (a run folder means its final/)")
    parser.add_argument("overrides", nargs="*", default=None, metavar="generate.key=value")
    parser.add_argument("--input", required=True, metavar="FILE_OR_URI",
                        help="prompts: a file, folder, glob or object-store URI")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="a new folder (or URI) for the result files")


def cmd_generate(ns: argparse.Namespace) -> int:
    from aigc_ray.generate import check_generate, load_generate_config, run_generate

    path, cfg = load_generate_config(ns.checkpoint, ns.overrides)
    files = check_generate(ns.input, ns.output, cfg)  # before Ray starts
    print(run_generate(str(path), ns.input, ns.output, cfg, files).line())
    return 0


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="a Hugging Face model folder (a run folder means its final/)")
    parser.add_argument("overrides", nargs="*", default=None, metavar="key=value")
    parser.add_argument("--data", metavar="FILE",
                        help="rows to score (jsonl/parquet pairs or text), read whole")
    parser.add_argument("--baseline", metavar="CHECKPOINT_OR_MODEL",
                        help="a model folder or hub id to score on the same rows, side by side")
    parser.add_argument("--output", metavar="FILE",
                        help="where to write the report (default: CHECKPOINT/eval.json)")
    parser.add_argument("--harness", metavar="TASKS",
                        help="lm-evaluation-harness tasks, comma-separated: names (arc_easy, "
                        "hellaswag; from the hub, so a network) or local task YAML files or "
                        "folders; scored through the served model")
    parser.add_argument("--limit", type=float, metavar="N",
                        help="with --harness: at most N documents per task (below 1: a fraction)")
    parser.add_argument("--url", metavar="URL",
                        help="with --harness: score CHECKPOINT as served at URL (e.g. "
                        "http://127.0.0.1:8000) instead of serving it here")


def cmd_eval(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from aigc_ray.checkpoint import resolve_checkpoint
    from aigc_ray.evaluate import eval_data, format_report, load_eval_config, run_eval
    from aigc_ray.run_folder import CheckpointFolder

    path, cfg = load_eval_config(ns.checkpoint, ns.overrides)
    baseline = ns.baseline
    if baseline and Path(baseline).expanduser().exists():
        baseline = str(resolve_checkpoint(baseline))
    if ns.harness is None and (ns.limit is not None or ns.url is not None):
        raise ConfigError("--limit and --url go with --harness TASKS; add it or drop them")
    harness = None
    if ns.harness is not None:  # the tasks exist and lm-eval is installed: before Ray starts
        from aigc_ray.harness import harness_spec, server_info

        harness = harness_spec(ns.harness, ns.limit, ns.url)
        if harness.url is not None:  # it answers, with this key
            server_info(harness.url, cfg.serve.resolve_api_key(), timeout_s=10)
    # Perplexity, ROUGE-L and BLEU need rows: --data, or the data the checkpoint was trained on
    # (its config.yaml). With --harness alone they are left out.
    data = ns.data is not None or CheckpointFolder(path).config.is_file()
    if not data and harness is None:
        raise ConfigError(f"{path} has no config.yaml naming the data it was trained on; pass "
                          "--data FILE with the rows to score (or --harness TASKS)")
    if data:
        eval_data(cfg, ns.data)  # a missing validation split fails before Ray starts
    output = Path(ns.output) if ns.output else CheckpointFolder(path).eval_report
    print(format_report(run_eval(str(path), cfg, ns.data, baseline, output, harness, data)))
    return 0


# ── submit JOBSPEC, jobs ACTION [JOB_ID] ─────────────────────────────────────────────────────


def add_submit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("jobspec", metavar="JOBSPEC",
                        help="a job spec YAML: entrypoint, runtime_env, entrypoint resources "
                        "(see jobs/)")
    parser.add_argument("overrides", nargs="*", default=None, metavar="key=value",
                        help="config overrides appended to the entrypoint")
    parser.add_argument("--address", help=ADDRESS_HELP)
    parser.add_argument("--follow", action="store_true",
                        help="stream the job's logs until it ends; exit 1 unless it SUCCEEDED")


def cmd_submit(ns: argparse.Namespace) -> int:
    # Checked before contacting the cluster; its aigc-ray commands must parse as ours.
    spec = load_job_spec(ns.jobspec, ns.overrides, parser=build_parser())
    jobs, job_id = submit(spec, ns.address)
    print(job_id, flush=True)
    if not ns.follow:
        print(f"follow it with: aigc-ray jobs logs {job_id} --follow", file=sys.stderr)
        return 0
    try:
        status = follow(jobs, job_id)
    except KeyboardInterrupt:
        print(f"stopped following; the job goes on (aigc-ray jobs stop {job_id} ends it)",
              file=sys.stderr)
        return 130
    print(f"job {job_id} {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def add_jobs_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=JOB_ACTIONS,
                        help="list: every job, oldest first; status: one line; logs: the job's "
                        "output so far; stop: ask the job to end; delete: forget an ended job "
                        "(its record and logs)")
    parser.add_argument("job_id", nargs="?", metavar="JOB_ID",
                        help="the id `aigc-ray submit` printed (see `aigc-ray jobs list`)")
    parser.add_argument("--address", help=ADDRESS_HELP)
    parser.add_argument("--follow", action="store_true",
                        help="logs: stream until the job ends; exit 1 unless it SUCCEEDED")


def cmd_jobs(ns: argparse.Namespace) -> int:
    return job_command(ns.action, ns.job_id, ns.address, ns.follow)


# ── the command table ────────────────────────────────────────────────────────────────────────


class Command(NamedTuple):
    name: str
    help: str  # the line in `aigc-ray --help`
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]  # returns the exit code
    description: str | None = None  # `aigc-ray NAME --help`'s text; None: the help line
    epilog: str | None = None


COMMANDS = (
    Command("train", "fine-tune a causal LM on Ray Train workers (DDP); rerun to resume",
            add_config_arguments, cmd_train,
            description="Fine-tune on Ray Train workers (DDP or FSDP2, scaling.strategy); rerun "
            "the same command to resume. On spot instances a node's preemption notice makes "
            "every worker checkpoint at the next step and Ray Train restart them from it "
            "(scaling.max_preemptions; scaling.elastic=true scaling.min_workers=N goes on with "
            "fewer workers, keeping the global batch).",
            epilog=CONFIG_HELP),
    Command("config", "print the resolved config as YAML (the API key redacted)",
            add_config_arguments, cmd_config,
            epilog=CONFIG_HELP),
    Command("data", "run the data pipeline once and print corpus statistics",
            add_config_arguments, cmd_data, epilog=CONFIG_HELP),
    Command(
        "tune", "search hyperparameters with Ray Tune; each trial is a DDP training run",
        add_tune_arguments, cmd_tune,
        description="Run the trials that tune.search_space describes, each a whole `aigc-ray "
        "train` run. tune.scheduler: asha (default) stops the losers, fifo runs every trial "
        "to its end, pbt continues the worse trials from the better ones' checkpoints with "
        "perturbed values (tune.pbt.*); tune.search_alg: random or optuna. Writes results.csv, "
        "tune_curves.png, best_config.yaml and best/ (the best model) to the run folder.",
        epilog=CONFIG_HELP),
    Command(
        "sample-data", "write the sample customer-support corpus", add_sample_data_arguments,
        cmd_sample_data,
        description="Write support.jsonl (prompt/completion pairs) and support.txt (one "
        "document a line) to DIR."),
    Command(
        "serve", "serve a checkpoint with Ray Serve over an OpenAI-style HTTP API",
        add_serve_arguments, cmd_serve,
        description="Deploy a Hugging Face causal-LM folder (a run's final/, a checkpoint, or "
        "your own model) as a Ray Serve app answering /v1/completions, /v1/chat/completions, "
        "/v1/models and /healthz. The folder's config.yaml serve section is the base. With "
        "an API key, requests must send 'Authorization: Bearer KEY': pass it as "
        "AIGC_RAY_API_KEY or serve.api_key_file=FILE (serve.api_key=KEY shows in `ps`); it is "
        "never written to disk, so a folder trained with one asks for it again.",
        epilog="key=value pairs override serve.* settings, e.g. serve.port=8001 "
        "serve.autoscaling.max_replicas=4 serve.max_batch_size=32 serve.api_key_file=~/.key"),
    Command(
        "generate", "batch generation: a completion for every prompt in files, by Ray Data",
        add_generate_arguments, cmd_generate,
        description="Read prompts (jsonl or parquet rows with a `prompt` field, or text: one a "
        "line; local paths, folders, globs or s3:// gs:// URIs) with Ray Data, complete them "
        "on a pool of model actors and write rows of id, prompt, completion, prompt_tokens, "
        "completion_tokens and finish_reason (parquet or JSONL) to OUTPUT, with _summary.json. "
        "Bad rows are skipped, counted and listed in _skipped.jsonl.",
        epilog="key=value pairs override generate.* settings, e.g. generate.concurrency=4 "
        "generate.batch_size=32 generate.max_tokens=128 generate.temperature=0.7 "
        "generate.output_format=jsonl generate.prompt_field=question generate.id_field=sku"),
    Command(
        "eval", "perplexity, ROUGE-L, BLEU and lm-evaluation-harness benchmarks of a "
        "checkpoint, optionally against a baseline",
        add_eval_arguments, cmd_eval,
        description="Score a model on held-out rows with Ray Data: perplexity (over completion "
        "tokens for prompt/completion data) and, for prompt/completion data, ROUGE-L and BLEU "
        "of greedy completions against the references. Without --data: the validation split "
        "of the corpus in the checkpoint's config.yaml. With --harness: lm-evaluation-harness "
        "tasks (pip install 'aigc-ray[harness]'), scored through the model served here by "
        "`aigc-ray serve`'s app, or at --url. Prints a table and writes eval.json.",
        epilog="key=value pairs override eval.*, data.*, generate.* and serve.* settings, e.g. "
        "eval.generate_rows=500 eval.max_tokens=128 data.prompt_field=question "
        "generate.concurrency=2 eval.harness_concurrency=16 serve.max_batch_size=32"),
    Command(
        "submit", "submit a job spec (jobs/*.yaml) to a Ray cluster through its job API",
        add_submit_arguments, cmd_submit,
        description="Check JOBSPEC (its aigc-ray entrypoint and the config it names) here, "
        "then submit it with its runtime_env (working_dir uploaded, pip/uv packages, env_vars) "
        "and entrypoint resources; prints the job id. Ray's token authentication is honoured: "
        "the token in RAY_AUTH_TOKEN or ~/.ray/auth_token is sent.",
        epilog="key=value pairs are appended to the entrypoint (its last command), e.g. "
        "aigc-ray submit jobs/train.yaml train.max_steps=2000 run.output_dir=/mnt/shared/runs"),
    Command(
        "jobs", "list submitted jobs, or show the status or logs of one, stop or delete it",
        add_jobs_arguments, cmd_jobs,
        description="aigc-ray jobs list | status JOB_ID | logs JOB_ID [--follow] | stop JOB_ID "
        "| delete JOB_ID. `status` exits 1 when the job FAILED or was STOPPED."),
)


class _Parser(argparse.ArgumentParser):
    """argparse with our error convention: a wrong command line is one line and exit 2 (argparse
    would print the usage text first)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The `aigc-ray` parser: a sub-command for each row of COMMANDS."""
    parser = _Parser(prog="aigc-ray", epilog=CONFIG_HELP,
                     description="Fine-tune and serve generative language models on a Ray cluster.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command_parser = sub.add_parser(command.name, help=command.help, epilog=command.epilog,
                                        description=command.description or command.help)
        command.add_arguments(command_parser)
        command_parser.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    # argparse stops filling `key=value ...` at the first option, so overrides written after
    # `--input FILE` land here; they are overrides all the same.
    if extra and isinstance(getattr(ns, "overrides", None), list) and all(
            "=" in item and not item.startswith("-") for item in extra):
        ns.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    in_main_thread = threading.current_thread() is threading.main_thread()
    on_sigterm = signal.signal(signal.SIGTERM, terminate_as_ctrl_c) if in_main_thread else None
    try:
        return ns.run(ns)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        message = user_error(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, on_sigterm)


def terminate_as_ctrl_c(signum, frame) -> None:
    """SIGTERM (systemd, Kubernetes, `kill`) does what Ctrl-C does: whatever handles SIGINT now
    (Ray Train and Tune stop their run resumably, Python raises KeyboardInterrupt and the
    commands clean up). `start_ray` keeps this handler in place of Ray's, which dumps a stack and
    aborts."""
    on_sigint = signal.getsignal(signal.SIGINT)
    if not callable(on_sigint):  # SIG_DFL or SIG_IGN: stop all the same
        raise KeyboardInterrupt
    on_sigint(signal.SIGINT, frame)


if __name__ == "__main__":
    sys.exit(main())
