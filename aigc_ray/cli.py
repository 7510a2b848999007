"""`aigc-ray <command> [CONFIG] [key=value ...]`: each command maps to one plain function."""

from __future__ import annotations

import argparse
import sys

from aigc_ray.config import (
    DEFAULT_CONFIG,
    ConfigError,
    load_config,
    shipped_configs,
    to_yaml,
    user_error,
)

CONFIG_HELP = (f"CONFIG is a YAML file or a shipped config name ({', '.join(sorted(shipped_configs()))}; "
               f"default {DEFAULT_CONFIG}); key=value pairs override it, e.g. train.lr=3e-4 "
               "scaling.num_workers=4")


def split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    """[CONFIG] [key=value ...] → (config or None, overrides)."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def _config(ns: argparse.Namespace):
    path, overrides = split_config_args(ns.args)
    bad = [item for item in overrides if "=" not in item]
    if bad:
        raise ConfigError(f"{bad[0]!r} is not key=value; only the first argument may name a config")
    return load_config(path, overrides)


def cmd_config(ns: argparse.Namespace) -> int:
    print(to_yaml(_config(ns)), end="")
    return 0


def cmd_data(ns: argparse.Namespace) -> int:
    from aigc_ray.cluster import start_ray
    from aigc_ray.data import check_config, corpus_statistics, format_statistics
    from aigc_ray.model import resolve_model_path

    cfg = _config(ns)
    files = check_config(cfg)  # before Ray starts
    start_ray(ray_logs=cfg.run.ray_logs)
    tokenizer_path = resolve_model_path(cfg)
    print(format_statistics(cfg, corpus_statistics(cfg, tokenizer_path), files))
    return 0


def cmd_train(ns: argparse.Namespace) -> int:
    from aigc_ray.train import run_train

    summary = run_train(_config(ns))
    for sample in summary.samples:
        print(f"sample reply  {sample['prompt']!r}\n           → {sample['reply']!r}")
    if summary.evaluation:
        from aigc_ray.evaluate import format_report

        print(format_report(summary.evaluation))
    print(summary.line())
    return 0


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


def cmd_sample_data(ns: argparse.Namespace) -> int:
    from aigc_ray.sample_data import write_sample_corpus

    written = write_sample_corpus(ns.dir, num_pairs=ns.pairs, seed=ns.seed)
    print(f"wrote {written['pairs']} support question/answer pairs to {written['jsonl']} "
          f"and {written['text']}")
    return 0


def cmd_serve(ns: argparse.Namespace) -> int:
    from aigc_ray.serve import run_serve, serve_config, write_serve_config

    path, cfg = serve_config(ns.checkpoint, ns.overrides)  # before Ray starts
    if ns.build:
        print(f"wrote {write_serve_config(path, cfg, ns.build)} "
              f"(serve deploy {ns.build}, or a RayService's serveConfigV2)")
        return 0
    reply = run_serve(path, cfg, once=ns.once)
    if reply is not None:
        choice = reply["choices"][0]
        print(f"prompt {ns.once!r}\n     → {choice['text']!r}  ({choice['finish_reason']}, "
              f"{reply['usage']['completion_tokens']} tokens from {reply['model']})")
    return 0


def cmd_generate(ns: argparse.Namespace) -> int:
    from aigc_ray.checkpoint import checkpoint_config
    from aigc_ray.generate import GENERATE_KEYS, check_generate, run_generate

    path, cfg = checkpoint_config(ns.checkpoint, ns.overrides, GENERATE_KEYS, "generate")
    files = check_generate(ns.input, ns.output, cfg)  # before Ray starts
    print(run_generate(str(path), ns.input, ns.output, cfg, files).line())
    return 0


def cmd_eval(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from aigc_ray.checkpoint import CHECKPOINT_CONFIG, checkpoint_config, resolve_checkpoint
    from aigc_ray.evaluate import EVAL_FILE, EVAL_KEYS, eval_data, format_report, run_eval

    path, cfg = checkpoint_config(ns.checkpoint, ns.overrides, EVAL_KEYS, "eval")
    baseline = ns.baseline
    if baseline and Path(baseline).expanduser().exists():
        baseline = str(resolve_checkpoint(baseline))
    if ns.data is None and not (path / CHECKPOINT_CONFIG).is_file():
        raise ConfigError(f"{path} has no config.yaml naming the data it was trained on; pass "
                          "--data FILE with the rows to score")
    eval_data(cfg, ns.data)  # a missing validation split fails before Ray starts
    output = Path(ns.output) if ns.output else path / EVAL_FILE
    print(format_report(run_eval(str(path), cfg, ns.data, baseline, output)))
    return 0


def cmd_submit(ns: argparse.Namespace) -> int:
    from aigc_ray.jobs import follow, load_job_spec, submit

    spec = load_job_spec(ns.jobspec, ns.overrides)  # before contacting the cluster
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


def cmd_jobs(ns: argparse.Namespace) -> int:
    from aigc_ray.jobs import client, job_api

    if ns.action != "list" and ns.job_id is None:
        raise ConfigError(f"aigc-ray jobs {ns.action} needs a JOB_ID (see aigc-ray jobs list)")
    jobs = client(ns.address)
    with job_api(f"aigc-ray jobs {ns.action}"):
        return _jobs_action(jobs, ns)


def _jobs_action(jobs, ns: argparse.Namespace) -> int:
    from aigc_ray.jobs import follow, status_line

    if ns.action == "list":
        for info in sorted(jobs.list_jobs(), key=lambda i: i.start_time or 0):
            print(status_line(info))
        return 0
    if ns.action == "status":
        info = jobs.get_job_info(ns.job_id)
        print(status_line(info))
        return 0 if str(info.status).endswith(("SUCCEEDED", "RUNNING", "PENDING")) else 1
    if ns.action == "stop":
        stopped = jobs.stop_job(ns.job_id)
        print(f"job {ns.job_id}: {'stop requested' if stopped else 'already ended'}")
        return 0
    if ns.action == "delete":  # Ray refuses a job that has not ended: one line, exit 2
        if not jobs.delete_job(ns.job_id):
            raise ConfigError(f"aigc-ray jobs delete: the cluster did not delete {ns.job_id}")
        print(f"job {ns.job_id}: deleted (its record and logs are gone from the cluster)")
        return 0
    if ns.follow:
        status = follow(jobs, ns.job_id)
        print(f"job {ns.job_id} {status}", file=sys.stderr)
        return 0 if status == "SUCCEEDED" else 1
    print(jobs.get_job_logs(ns.job_id), end="")
    return 0


COMMANDS = {
    # name: (help, handler, takes CONFIG)
    "train": ("fine-tune a causal LM on Ray Train workers (DDP); rerun to resume", cmd_train,
              True),
    "config": ("print the resolved config as YAML", cmd_config, True),
    "data": ("run the data pipeline once and print corpus statistics", cmd_data, True),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aigc-ray",
        description="Fine-tune and serve generative language models on a Ray cluster.",
        epilog=CONFIG_HELP,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, handler, takes_config) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text, epilog=CONFIG_HELP
                                 if takes_config else None)
        command.set_defaults(handler=handler)
        if takes_config:
            command.add_argument("args", nargs="*", metavar="[CONFIG] [key=value ...]")
        else:
            command.add_argument("args", nargs="*")
    tune = sub.add_parser(
        "tune", help="search hyperparameters with Ray Tune; each trial is a DDP training run",
        description="Run the trials that tune.search_space describes, each a whole `aigc-ray "
        "train` run; ASHA (tune.scheduler) stops the losers. Writes results.csv, "
        "tune_curves.png, best_config.yaml and best/ (the best model) to the run folder.",
        epilog=CONFIG_HELP)
    tune.add_argument("args", nargs="*", metavar="[CONFIG] [key=value ...]")
    tune.add_argument("--resume", action="store_true",
                      help="continue the interrupted search in the run folder")
    tune.set_defaults(handler=cmd_tune)
    sample = sub.add_parser("sample-data", help="write the sample customer-support corpus",
                            description="Write support.jsonl (prompt/completion pairs) and "
                            "support.txt (one document a line) to DIR.")
    sample.add_argument("dir", metavar="DIR")
    sample.add_argument("--pairs", type=int, default=4000, help="question/answer pairs (4000)")
    sample.add_argument("--seed", type=int, default=0, help="random seed (0)")
    sample.set_defaults(handler=cmd_sample_data)
    serve = sub.add_parser(
        "serve", help="serve a checkpoint with Ray Serve over an OpenAI-style HTTP API",
        description="Deploy a Hugging Face causal-LM folder (a run's final/, a checkpoint, or "
        "your own model) as a Ray Serve app answering /v1/completions, /v1/chat/completions, "
        "/v1/models and /healthz. The folder's config.yaml serve section is the base.",
        epilog="key=value pairs override serve.* settings, e.g. serve.port=8001 "
        "serve.autoscaling.max_replicas=4 serve.max_batch_size=32")
    serve.add_argument("checkpoint", metavar="CHECKPOINT")
    serve.add_argument("overrides", nargs="*", metavar="serve.key=value")
    serve.add_argument("--build", metavar="FILE",
                       help="write a Ray Serve config file (serve deploy / KubeRay) and exit")
    serve.add_argument("--once", metavar="PROMPT",
                       help="deploy, answer PROMPT through the HTTP API, print it, shut down")
    serve.set_defaults(handler=cmd_serve)
    generate = sub.add_parser(
        "generate", help="batch generation: a completion for every prompt in files, by Ray Data",
        description="Read prompts (jsonl or parquet rows with a `prompt` field, or text: one a "
        "line; local paths, folders, globs or s3:// gs:// URIs) with Ray Data, complete them on "
        "a pool of model actors and write rows of id, prompt, completion, prompt_tokens, "
        "completion_tokens and finish_reason (parquet or JSONL) to OUTPUT, with _summary.json. "
        "Bad rows are skipped, counted and listed in _skipped.jsonl.",
        epilog="key=value pairs override generate.* settings, e.g. generate.concurrency=4 "
        "generate.batch_size=32 generate.max_tokens=128 generate.temperature=0.7 "
        "generate.output_format=jsonl generate.prompt_field=question generate.id_field=sku")
    generate.add_argument("checkpoint", metavar="CHECKPOINT",
                          help="a Hugging Face model folder (a run folder means its final/)")
    generate.add_argument("overrides", nargs="*", metavar="generate.key=value")
    generate.add_argument("--input", required=True, metavar="FILE_OR_URI",
                          help="prompts: a file, folder, glob or object-store URI")
    generate.add_argument("--output", required=True, metavar="DIR",
                          help="a new folder (or URI) for the result files")
    generate.set_defaults(handler=cmd_generate)
    evaluate = sub.add_parser(
        "eval", help="perplexity, ROUGE-L and BLEU of a checkpoint, optionally against a baseline",
        description="Score a model on held-out rows with Ray Data: perplexity (over completion "
        "tokens for prompt/completion data) and, for prompt/completion data, ROUGE-L and BLEU "
        "of greedy completions against the references. Without --data: the validation split "
        "of the corpus in the checkpoint's config.yaml. Prints a table and writes eval.json.",
        epilog="key=value pairs override eval.*, data.* and generate.* settings, e.g. "
        "eval.generate_rows=500 eval.max_tokens=128 data.prompt_field=question "
        "generate.concurrency=2")
    evaluate.add_argument("checkpoint", metavar="CHECKPOINT",
                          help="a Hugging Face model folder (a run folder means its final/)")
    evaluate.add_argument("overrides", nargs="*", metavar="key=value")
    evaluate.add_argument("--data", metavar="FILE",
                          help="rows to score (jsonl/parquet pairs or text), read whole")
    evaluate.add_argument("--baseline", metavar="CHECKPOINT_OR_MODEL",
                          help="a model folder or hub id to score on the same rows, side by side")
    evaluate.add_argument("--output", metavar="FILE",
                          help="where to write the report (default: CHECKPOINT/eval.json)")
    evaluate.set_defaults(handler=cmd_eval)
    address_help = ("the Ray dashboard (job API) address, e.g. http://HEAD:8265; it wins over "
                    "RAY_ADDRESS. Default: RAY_API_SERVER_ADDRESS or RAY_ADDRESS, else the head "
                    "`ray start --head` started on this machine")
    submit = sub.add_parser(
        "submit", help="submit a job spec (jobs/*.yaml) to a Ray cluster through its job API",
        description="Check JOBSPEC (its aigc-ray entrypoint and the config it names) here, "
        "then submit it with its runtime_env (working_dir uploaded, pip/uv packages, env_vars) "
        "and entrypoint resources; prints the job id. Ray's token authentication is honoured: "
        "the token in RAY_AUTH_TOKEN or ~/.ray/auth_token is sent.",
        epilog="key=value pairs are appended to the entrypoint (its last command), e.g. "
        "aigc-ray submit jobs/train.yaml train.max_steps=2000 run.output_dir=/mnt/shared/runs")
    submit.add_argument("jobspec", metavar="JOBSPEC",
                        help="a job spec YAML: entrypoint, runtime_env, entrypoint resources "
                        "(see jobs/)")
    submit.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides appended to the entrypoint")
    submit.add_argument("--address", help=address_help)
    submit.add_argument("--follow", action="store_true",
                        help="stream the job's logs until it ends; exit 1 unless it SUCCEEDED")
    submit.set_defaults(handler=cmd_submit)
    jobs = sub.add_parser(
        "jobs", help="list submitted jobs, or show the status or logs of one, stop or delete it",
        description="aigc-ray jobs list | status JOB_ID | logs JOB_ID [--follow] | stop JOB_ID "
        "| delete JOB_ID. `status` exits 1 when the job FAILED or was STOPPED.")
    jobs.add_argument("action", choices=["list", "status", "logs", "stop", "delete"],
                      help="list: every job, oldest first; status: one line; logs: the job's "
                      "output so far; stop: ask the job to end; delete: forget an ended job "
                      "(its record and logs)")
    jobs.add_argument("job_id", nargs="?", metavar="JOB_ID",
                      help="the id `aigc-ray submit` printed (see `aigc-ray jobs list`)")
    jobs.add_argument("--address", help=address_help)
    jobs.add_argument("--follow", action="store_true",
                      help="logs: stream until the job ends; exit 1 unless it SUCCEEDED")
    jobs.set_defaults(handler=cmd_jobs)
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
    try:
        return ns.handler(ns)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        message = user_error(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
