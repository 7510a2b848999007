"""Batch generation on real Ray Data: rows in = rows out + rows skipped, ids kept, greedy output
equal to `model.generate` on each prompt alone, bad rows counted and listed, strict mode fails."""

from __future__ import annotations

import json

import pyarrow.dataset as pads
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from aigc_ray.cli import main
from aigc_ray.generate import SKIPPED_FILE, SUMMARY_FILE, load_generate_config, run_generate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prompts_file(sample_corpus, tmp_path_factory):
    """24 good rows with ids, one good row without an id, and three bad rows."""
    with open(sample_corpus["jsonl"], encoding="utf-8") as f:
        pairs = [json.loads(line) for _, line in zip(range(24), f)]
    lines = [json.dumps({"id": f"sku-{i}", "prompt": p["prompt"]}) for i, p in enumerate(pairs)]
    lines += [json.dumps({"prompt": "Customer: Where is my order?\nAgent:"}),  # no id
              "{not json",  # line 26
              json.dumps({"id": "no-prompt", "question": "hi"}),  # line 27: missing field
              json.dumps({"id": "empty", "prompt": "   "})]  # line 28: empty
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def direct_greedy(model_dir: str, prompt: str, max_new_tokens: int) -> str:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_every_input_row_is_written_or_skipped_and_greedy_equals_generate(
        ray_cluster, tiny_model_dir, prompts_file, tmp_path):
    out = tmp_path / "out"
    path, cfg = load_generate_config(tiny_model_dir, ["generate.max_tokens=12",
                                                      "generate.batch_size=8"])
    summary = run_generate(str(path), str(prompts_file), str(out), cfg)

    rows = pads.dataset(str(out), format="parquet").to_table().to_pylist()
    ids = sorted(row["id"] for row in rows)
    assert ids == sorted([f"sku-{i}" for i in range(24)] + ["prompts.jsonl:25"])
    assert summary.input_rows == 28 and summary.written_rows == 25
    assert summary.skipped == {"invalid_json": 1, "missing_field": 1, "empty_text": 1}
    assert summary.written_rows + sum(summary.skipped.values()) == summary.input_rows
    skipped = [json.loads(line) for line in (out / SKIPPED_FILE).read_text().splitlines()]
    assert [(s["line"], s["reason"]) for s in skipped] == [
        (26, "invalid_json"), (27, "missing_field"), (28, "empty_text")]
    record = json.loads((out / SUMMARY_FILE).read_text())
    assert record["written_rows"] == 25
    # Time inside the decode engine: part of the run, and the line reports its token rate.
    assert 0 < summary.decode_seconds < summary.seconds
    assert record["decode_seconds"] == round(summary.decode_seconds, 3)
    assert "tokens/s per actor while decoding" in summary.line()

    by_id = {row["id"]: row for row in rows}
    for row_id in ("sku-0", "sku-7", "prompts.jsonl:25"):  # different batches, different lengths
        row = by_id[row_id]
        assert row["completion"] == direct_greedy(tiny_model_dir, row["prompt"], 12)
        assert row["finish_reason"] in ("stop", "length")
        assert 0 < row["completion_tokens"] <= 12 and row["prompt_tokens"] > 0


def test_cli_text_input_jsonl_output_and_strict_mode(ray_cluster, tiny_model_dir, tmp_path,
                                                      capsys):
    text = tmp_path / "prompts.txt"
    text.write_text("Customer: Hi\nAgent:\n\nCustomer: My invoice is wrong.\n")
    out = tmp_path / "out"
    assert main(["generate", tiny_model_dir, "--input", str(text), "--output", str(out),
                 "generate.output_format=jsonl", "generate.max_tokens=4",
                 "generate.temperature=0.8", "generate.seed=3"]) == 0
    assert "wrote 3 completions" in capsys.readouterr().out
    parts = [f for f in sorted(out.iterdir()) if not f.name.startswith("_")]
    assert parts and all(f.suffix == ".jsonl" for f in parts)
    rows = [json.loads(line) for f in parts for line in f.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == ["prompts.txt:1", "prompts.txt:2", "prompts.txt:4"]
    assert json.loads((out / SUMMARY_FILE).read_text())["skipped"] == {"empty_text": 1}

    # An existing output folder is refused before Ray does any work; strict mode names the row.
    assert main(["generate", tiny_model_dir, "--input", str(text), "--output", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["generate", tiny_model_dir, "--input", str(text), "--output",
                 str(tmp_path / "strict"), "generate.strict=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "line 3: empty text" in err and "generate.strict" in err


def test_parquet_in_and_out_through_uris(ray_cluster, tiny_model_dir, tmp_path):
    """Object-store style: file:// URIs go through the same pyarrow filesystems as s3:// and gs://."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"sku": [7, 8, 9], "prompt": ["Customer: A\nAgent:", None,
                                                           "Customer: B\nAgent:"]}),
                   tmp_path / "prompts.parquet")
    path, cfg = load_generate_config(tiny_model_dir, ["generate.id_field=sku",
                                                      "generate.max_tokens=4"])
    summary = run_generate(str(path), f"file://{tmp_path}/prompts.parquet",
                           f"file://{tmp_path}/out", cfg)
    rows = pads.dataset(str(tmp_path / "out"), format="parquet").to_table().to_pylist()
    assert sorted(r["id"] for r in rows) == ["7", "9"]
    assert summary.skipped == {"missing_field": 1} and summary.input_rows == 3
    assert json.loads((tmp_path / "out" / SKIPPED_FILE).read_text())["id"] == "8"


def test_a_list_of_messages_is_rendered_by_the_chat_template(ray_cluster, tiny_chat_model_dir,
                                                             tmp_path):
    """A prompt that is a conversation goes through `chat_ids`, as the chat endpoint and training
    render it: greedy output equals `model.generate` on the rendered prompt."""
    from aigc_ray.data.chat import chat_ids

    chats = [[{"role": "user", "content": "Where is my Orbit Watch order?"}],
             [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "How do I cancel Vega Laptop?"}]]
    lines = [json.dumps({"id": f"c{i}", "messages": m}) for i, m in enumerate(chats)]
    lines.append(json.dumps({"id": "bad", "messages": [{"role": "robot", "content": "hi"}]}))
    (tmp_path / "chats.jsonl").write_text("\n".join(lines) + "\n")
    path, cfg = load_generate_config(tiny_chat_model_dir, ["generate.prompt_field=messages",
                                                           "generate.max_tokens=10"])
    summary = run_generate(str(path), str(tmp_path / "chats.jsonl"), str(tmp_path / "out"), cfg)
    assert summary.skipped == {"unknown_role": 1}
    rows = {r["id"]: r for r in pads.dataset(str(tmp_path / "out"),
                                             format="parquet").to_table().to_pylist()}
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir).eval()
    for i, messages in enumerate(chats):
        ids = torch.tensor([chat_ids(tokenizer, messages, add_generation_prompt=True)])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=10, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        row = rows[f"c{i}"]
        assert json.loads(row["prompt"]) == messages and row["prompt_tokens"] == ids.shape[1]
        assert row["completion"] == tokenizer.decode(out[0, ids.shape[1]:],
                                                     skip_special_tokens=True)


def test_ignore_eos_holds_every_completion_to_max_tokens(ray_cluster, tiny_model_dir, tmp_path):
    """generate.* takes the serving API's controls: with ignore_eos every row is exactly
    max_tokens long (what a benchmark of decode speed needs)."""
    (tmp_path / "p.txt").write_text("Customer: Hi\nAgent:\nCustomer: Where is my order?\n")
    path, cfg = load_generate_config(tiny_model_dir, ["generate.max_tokens=7",
                                                      "generate.ignore_eos=true",
                                                      "generate.repetition_penalty=1.3",
                                                      "generate.top_k=5"])
    run_generate(str(path), str(tmp_path / "p.txt"), str(tmp_path / "out"), cfg)
    rows = pads.dataset(str(tmp_path / "out"), format="parquet").to_table().to_pylist()
    assert len(rows) == 3 and all(r["completion_tokens"] == 7 for r in rows)
    assert all(r["finish_reason"] == "length" for r in rows)
