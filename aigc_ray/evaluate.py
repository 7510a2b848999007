"""Evaluation: perplexity on held-out text, ROUGE-L and BLEU of generated completions.

Both run on Ray Data. Perplexity: the documents go through the training pipeline's tokenizer
and packer (so it is the `val_perplexity` training reports, for prompt/completion data over the
completion tokens only), then `LossSum` actors sum next-token cross-entropy and count target
tokens per batch; perplexity is exp(total loss / total tokens) over the whole set. ROUGE-L and
BLEU: the same `Completer` actors batch generation uses write greedy completions of up to
`eval.generate_rows` prompts (the same rows for a model and its baseline), scored against the
references with Google's `rouge-score` (mean ROUGE-L F1, stemmed) and `sacrebleu` (corpus
BLEU), both reported ×100.

With a baseline (`--baseline`, or the starting model at the end of `aigc-ray train`:
`evaluate_after_training`) both models see the same rows; each tokenizes with its own tokenizer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from aigc_ray.checkpoint import checkpoint_config
from aigc_ray.config import Config
from aigc_ray.data.files import format_of
from aigc_ray.data.pack import tokenize
from aigc_ray.data.pipeline import check_config
from aigc_ray.data.read import MESSAGES_COLUMN, ROW_COLUMN, corpus_source, read_corpus
from aigc_ray.errors import ConfigError
from aigc_ray.run_folder import RunFolder
from aigc_ray.tokenizer import tokenizer_spec
from aigc_ray.train.metrics import read_jsonl
from aigc_ray.train.trackers import open_trackers

if TYPE_CHECKING:
    from aigc_ray.harness import Harness
    from aigc_ray.train.driver import TrainSummary

# serve: how `--harness` serves the checkpoint for lm-evaluation-harness.
EVAL_KEYS = ("eval", "data", "generate", "serve", "model.trust_remote_code")
METRICS = (("perplexity", "lower is better"), ("rouge_l", "higher is better"),
           ("bleu", "higher is better"))


def load_eval_config(checkpoint: str, overrides: list[str] | None = None
                     ) -> tuple[Path, Config]:
    """(model folder, Config) for evaluation: the folder's config.yaml eval, data and generate
    sections (if any), then `key=value` overrides of those. Raises a one-line ConfigError."""
    return checkpoint_config(checkpoint, overrides, EVAL_KEYS, "eval")


class LossSum:
    """Ray Data callable class: (summed next-token loss, target tokens) of each batch."""

    def __init__(self, model_path: str, generate: dict, trust_remote_code: bool = False):
        from aigc_ray.config import Generate
        from aigc_ray.model import load_for_inference

        gen = Generate.model_validate(generate)
        # float32 everywhere: perplexity is a comparison, and bf16 logits would blur it.
        self.model, _ = load_for_inference(model_path, gen.device, "float32",
                                           trust_remote_code=trust_remote_code,
                                           threads=gen.cpus_per_actor)
        self.device = next(self.model.parameters()).device
        self.chunked = chunk_loss_if_large(self.model, self.device)

    def __call__(self, batch: dict) -> dict:
        import numpy as np
        import torch

        from aigc_ray.train.loss import token_loss_sum, trim_padding

        # Trim on the host: reading the mask's length on a GPU would wait for the device.
        tensors = {k: v.to(self.device) for k, v in trim_padding(
            {k: torch.from_numpy(np.array(v)) for k, v in batch.items()}).items()}
        with torch.inference_mode():
            loss, tokens = token_loss_sum(self.model, tensors, self.chunked)
        return {"loss_sum": np.array([float(loss)]), "tokens": np.array([int(tokens)])}


def chunk_loss_if_large(model, device) -> bool:
    """Score with the chunked loss (no full logits tensor) where training's `auto` would: a
    large vocabulary, and a model whose logits are its output layer's (else plain)."""
    from aigc_ray.errors import UserError
    from aigc_ray.train.loss import check_chunked_loss, loss_impl_for, use_chunked_loss

    if loss_impl_for("auto", model.get_output_embeddings().weight.shape[0]) != "chunked":
        return False
    use_chunked_loss(model)
    try:
        check_chunked_loss(model, device)
    except UserError:
        return False  # its labels-free forward is its own: the plain loss still works
    return True


def perplexity(model_path: str, cfg: Config, split: str | None, files: list[str]) -> dict:
    """{'perplexity', 'loss', 'tokens'} of a model on the split's documents (None: all)."""
    import ray

    from aigc_ray.generate import use_gpu

    blocks = tokenize(read_corpus(cfg, split, files=files), cfg,
                      tokenizer_spec(model_path, cfg.model.trust_remote_code), split or "all")
    gen = cfg.generate
    sums = blocks.map_batches(
        LossSum,
        fn_constructor_kwargs={"model_path": model_path, "generate": gen.model_dump(),
                               "trust_remote_code": cfg.model.trust_remote_code},
        batch_size=cfg.eval.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=gen.concurrency), num_cpus=gen.cpus_per_actor,
        num_gpus=gen.gpus_per_actor if use_gpu(gen) else None,
    )
    loss, tokens = 0.0, 0
    for batch in sums.iter_batches(batch_size=None, batch_format="numpy"):
        loss += float(batch["loss_sum"].sum())
        tokens += int(batch["tokens"].sum())
    if tokens == 0:
        raise ConfigError("the evaluation data has no tokens to score; pass --data with rows")
    return {"perplexity": math.exp(loss / tokens), "loss": loss / tokens, "tokens": tokens}


def generation_rows(cfg: Config, split: str | None, files: list[str]):
    """Up to `eval.generate_rows` prompt/completion rows, materialized once so that the model
    and its baseline are scored on the very same rows however the files were read. A
    conversation becomes the chat up to its last reply (the prompt) and that reply."""
    rows = read_corpus(cfg, split, files=files)
    if cfg.eval.generate_rows:
        rows = rows.limit(cfg.eval.generate_rows)
    if cfg.data.chat:
        rows = rows.map(_chat_prompt)
    return rows.materialize()


def _chat_prompt(row: dict) -> dict:
    from aigc_ray.generate import CHAT_COLUMN

    messages = json.loads(row[MESSAGES_COLUMN])
    return {ROW_COLUMN: row[ROW_COLUMN], "prompt": json.dumps(messages[:-1], ensure_ascii=False),
            "reference": messages[-1]["content"], CHAT_COLUMN: True}


def generation_scores(model_path: str, cfg: Config, rows) -> dict:
    """{'rouge_l', 'bleu', 'generated'} of greedy completions of `rows` against references."""
    import sacrebleu
    from rouge_score import rouge_scorer

    from aigc_ray.generate import complete

    data = cfg.data
    greedy = cfg.generate.model_copy(update={"temperature": 0.0, "max_tokens": cfg.eval.max_tokens,
                                             "stop": []})
    prompt, reference = ("prompt", "reference") if data.chat else (data.prompt_field,
                                                                    data.completion_field)
    done = complete(rows, model_path, cfg, prompt_column=prompt, id_column=ROW_COLUMN,
                    keep={"reference": reference}, generate=greedy).take_all()
    if not done:
        return {"rouge_l": None, "bleu": None, "generated": 0}
    done.sort(key=lambda row: row["id"])  # a stable order for eval.json and BLEU's corpus
    hypotheses = [row["completion"].strip() for row in done]
    references = [str(row["reference"]).strip() for row in done]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(ref, hyp)["rougeL"].fmeasure for ref, hyp in zip(references, hypotheses)]
    bleu = sacrebleu.corpus_bleu(hypotheses, [references])
    return {"rouge_l": 100 * sum(rouge) / len(rouge), "bleu": bleu.score, "generated": len(done),
            "examples": [{"prompt": row["prompt"], "reference": ref, "completion": hyp}
                         for row, ref, hyp in list(zip(done, references, hypotheses))[:3]]}


def evaluate_model(model_path: str, cfg: Config, split: str | None, files: list[str],
                   rows=None) -> dict:
    """Every metric the data allows: perplexity always, ROUGE-L/BLEU on `rows` (from
    `generation_rows`) for prompt/completion data."""
    result = {"model": str(model_path), **perplexity(model_path, cfg, split, files)}
    if rows is not None:
        result.update(generation_scores(model_path, cfg, rows))
    return result


def eval_data(cfg: Config, data_path: str | None) -> tuple[Config, str | None]:
    """(config whose data section reads the evaluation rows, split): `--data FILE` is read
    whole (its format from its extension); without it, the checkpoint's validation split."""
    if data_path is None:
        if cfg.data.val_fraction == 0:
            raise ConfigError("the checkpoint's config has data.val_fraction 0, so there is no "
                              "validation split; pass --data FILE")
        return cfg, "val"
    fmt = format_of(data_path) or cfg.data.format
    update = {"path": data_path, "format": fmt}
    if fmt == "text":  # plain text has no prompt/completion fields: perplexity only
        update.update(prompt_field=None, completion_field=None, chat_format="none",
                      train_on="assistant")
    data = cfg.data.model_validate({**cfg.data.model_dump(), **update})
    return cfg.model_copy(update={"data": data}), None


def run_eval(checkpoint: str, cfg: Config, data_path: str | None = None,
             baseline: str | None = None, output: Path | None = None,
             harness: Harness | None = None, data: bool = True) -> dict:
    """Evaluate `checkpoint` (and `baseline` on the same rows and tasks); write and return the
    report. `data`: perplexity, ROUGE-L and BLEU on the data rows; `harness`: lm-evaluation-
    harness tasks through the served model (`aigc_ray.harness`). Either may be off, not both."""
    from aigc_ray.cluster import start_ray

    if data:
        cfg, split = eval_data(cfg, data_path)
        files = check_config(cfg)  # the data exists: before Ray starts
    start_ray(ray_logs=cfg.run.ray_logs)
    report: dict = {"model": {"model": str(checkpoint)}}
    if baseline:
        report["baseline"] = {"model": baseline}
    if data:
        # Read up to three times (generation rows, the model's and the baseline's perplexity):
        # an hf dataset is put in the object store once for all of them.
        files = corpus_source(cfg, files)
        report["data"] = {"path": cfg.data.paths, "format": cfg.data.format,
                          "split": split or "all", "prompt_completion": cfg.data.supervised,
                          "chat_format": cfg.data.chat_format}
        scored = cfg.data.supervised or cfg.data.chat
        rows = generation_rows(cfg, split, files) if scored else None
        report["model"] = evaluate_model(str(checkpoint), cfg, split, files, rows)
        if baseline:
            report["baseline"] = evaluate_model(baseline, cfg, split, files, rows)
    if harness is not None:
        from aigc_ray.harness import harness_scores

        report["harness"] = {"tasks": list(harness.labels), "limit": harness.limit}
        models = {"model": str(checkpoint), **({"baseline": baseline} if baseline else {})}
        for side, result in harness_scores(models, cfg, harness).items():
            report[side]["harness"] = result.pop("tasks")
            report["harness"][side] = result  # seconds, concurrency, url
    if baseline:
        report["difference"] = differences(report["model"], report["baseline"])
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2) + "\n")
        report["written_to"] = str(output)
    return report


def differences(model: dict, baseline: dict) -> dict:
    """Model minus baseline: each data metric both have, and under "harness" each task's
    metrics (not their stderrs or sample counts)."""
    out: dict = {name: model[name] - baseline[name] for name, _ in METRICS
                 if model.get(name) is not None and baseline.get(name) is not None}
    if "harness" in model and "harness" in baseline:
        out["harness"] = {
            task: {metric: value - baseline["harness"][task][metric]
                   for metric, value in row.items()
                   if harness_metric(metric) and metric in baseline["harness"].get(task, {})}
            for task, row in model["harness"].items() if task in baseline["harness"]}
    return out


def harness_metric(name: str) -> bool:
    """Whether a harness result column is a score (not a stderr or the sample count)."""
    return name != "samples" and "_stderr" not in name


def evaluate_after_training(cfg: Config, summary: TrainSummary) -> dict | None:
    """`eval.after_training`: a finished `run_train`'s final/ against the model it started from,
    on the validation split, written to the run folder's eval.json. None when the setting is off
    or the run had no validation split."""
    if not cfg.eval.after_training or not cfg.data.val_fraction > 0:
        return None
    final = summary.final_dir
    print(f"[aigc-ray] evaluating {final.name}/ against the starting model on the "
          "validation split", flush=True)
    run = RunFolder(summary.run_dir)
    report = run_eval(str(final), cfg, baseline=summary.start_model, output=run.eval_report)
    if trackers := open_trackers(cfg, run.path):  # the training run's own tracker runs
        step = max((row["step"] for row in read_jsonl(run.metrics)), default=0)
        trackers.metrics({"step": step, **{f"eval/{side}/{name}": report[side][name]
                                           for side in ("model", "baseline")
                                           for name, _ in METRICS
                                           if report.get(side, {}).get(name) is not None}})
        trackers.files(run.eval_report)
        trackers.close()
    return report


def _short(path: str) -> str:
    parts = Path(path).parts
    return "/".join(parts[-2:]) if len(parts) > 1 else path


def format_report(report: dict) -> str:
    """The table `aigc-ray eval` and `aigc-ray train` print."""
    model, baseline = report["model"], report.get("baseline")
    names = [_short(model["model"])] + ([f"baseline {_short(baseline['model'])}"]
                                        if baseline else [])
    # (label, which way is better, model, baseline, difference, decimals)
    rows = [(name, better, model.get(name), (baseline or {}).get(name),
             report.get("difference", {}).get(name), 2) for name, better in METRICS]
    lines = []
    if "data" in report:
        data = report["data"]
        header = (f"eval on {', '.join(data['path'])} ({data['split']} rows): "
                  f"{model['tokens']:,} tokens scored")
        if model.get("generated") is not None:
            header += f", {model['generated']} completions generated (greedy)"
        lines.append(header)
    if "harness" in report:
        harness = report["harness"]
        limit = "" if harness["limit"] is None else f", at most {harness['limit']:g} documents each"
        lines.append(f"lm-evaluation-harness on {', '.join(harness['tasks'])}{limit} "
                     f"({harness['model']['seconds']:.0f} s)")
        differences = report.get("difference", {}).get("harness", {})
        for task, scores in model["harness"].items():
            base = (baseline or {}).get("harness", {}).get(task, {})
            rows += [(f"{task} {metric}", HARNESS_BETTER.get(metric, ""), value, base.get(metric),
                      differences.get(task, {}).get(metric), 4 if abs(value) < 10 else 2)
                     for metric, value in scores.items() if harness_metric(metric)]
    label = max(12, *(len(row[0]) for row in rows)) + 2
    width = max(12, *(len(n) for n in names)) + 2
    lines.append(f"{'metric':<{label}}" + "".join(f"{n:>{width}}" for n in names)
                 + ("  difference" if baseline else ""))
    for name, better, value, base, difference, digits in rows:
        if value is None:
            continue
        line = f"{name:<{label}}{value:>{width}.{digits}f}"
        if base is not None and difference is not None:
            line += f"{base:>{width}.{digits}f}  {difference:+.{digits}f}"
        lines.append(f"{line}   ({better})" if better else line)
    if "written_to" in report:
        lines.append(f"written to {report['written_to']}")
    return "\n".join(lines)


# How lm-eval's usual metrics read; a task's own metric shows without a note.
HARNESS_BETTER = {metric: "higher is better" for metric in (
    "acc", "acc_norm", "exact_match", "f1", "mcc", "bleu", "rouge1", "rouge2", "rougeL")} | {
    metric: "lower is better" for metric in ("word_perplexity", "byte_perplexity",
                                             "bits_per_byte", "perplexity")}
