"""generate settings and checks that run before Ray starts: input formats, overrides, the
resource warning, row seeds, the progress line."""


import pytest

from aigc_ray.config import load_config
from aigc_ray.errors import ConfigError
from aigc_ray.generate import (
    check_generate,
    count_input_rows,
    cpu_shortage_warning,
    generation_progress_line,
    input_format,
    load_generate_config,
    row_seed,
)


def test_input_format_follows_the_extension_unless_set():
    assert input_format(["a/b.jsonl"], "auto") == "jsonl"
    assert input_format(["s3://bucket/p.parquet"], "auto") == "parquet"
    assert input_format(["notes.txt"], "auto") == "text"
    assert input_format(["prompts.csv"], "text") == "text"
    with pytest.raises(ConfigError, match="generate.input_format"):
        input_format(["prompts.csv"], "auto")


def test_generate_refuses_a_missing_input_and_a_used_output(tmp_path):
    cfg = load_config()
    with pytest.raises(ConfigError, match="--input .* does not exist"):
        check_generate(str(tmp_path / "nope.jsonl"), str(tmp_path / "out"), cfg)
    source = tmp_path / "p.jsonl"
    source.write_text('{"prompt": "hi"}\n')
    used = tmp_path / "used"
    used.mkdir()
    (used / "part-0.parquet").write_text("x")
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        check_generate(str(source), str(used), cfg)
    assert check_generate(str(source), str(tmp_path / "new"), cfg) == [str(source)]


def test_generate_overrides_are_generate_keys_only(tiny_model_dir):
    path, cfg = load_generate_config(tiny_model_dir, ["generate.batch_size=4"])
    assert cfg.generate.batch_size == 4 and cfg.generate.temperature == 0.0
    for bad, words in [(["train.lr=1"], "generate.key=value"),
                       (["generate.temprature=1"], "did you mean generate.temperature"),
                       (["generate.top_p=0"], "generate.top_p must be > 0")]:
        with pytest.raises(ConfigError, match=words):
            load_generate_config(tiny_model_dir, bad)


def test_a_cluster_too_small_for_the_actors_and_the_io_warns():
    two = load_config(None, ["generate.concurrency=2"])
    assert "generate.concurrency 2" in cpu_shortage_warning(two, {"CPU": 2})
    assert cpu_shortage_warning(load_config(), {"CPU": 2}) is None  # the default: one actor
    assert cpu_shortage_warning(load_config(None, ["generate.concurrency=2",
                                                   "generate.cpus_per_actor=0.75"]),
                                {"CPU": 2}) is None


def test_row_seed_depends_on_seed_and_id_only():
    assert row_seed(0, "a") == row_seed(0, "a") != row_seed(0, "b") != row_seed(1, "b")


def test_progress_line_counts_rows_against_the_input_total(tmp_path):
    source = tmp_path / "p.txt"
    source.write_text("a\n\nb\nc")  # four rows: the blank one is skipped, the last has no \n
    assert count_input_rows([str(source)], "text") == 4
    assert count_input_rows(["s3://bucket/p.txt"], "text") is None
    line = generation_progress_line({"generated": 30, "skipped.empty_text": 10}, 100, 10.0)
    assert line == ("[aigc-ray] generated 30/100 rows (40%, about 20 s left) | 10 skipped | "
                    "3.0 completions/s")
    assert "generated 5 rows | 0 skipped" in generation_progress_line({"generated": 5}, None,
                                                                      1.0)


def test_actors_get_several_decode_batches_per_call_only_with_cuda_graphs_on_a_gpu():
    from aigc_ray.config import Generate
    from aigc_ray.generate import REFILL_BATCHES, prompts_per_call

    gen = Generate(batch_size=16, cuda_graphs=True)
    assert prompts_per_call(gen, gpu=False) == 16  # CPU: batches run to their end
    assert prompts_per_call(gen, gpu=True) == 16 * REFILL_BATCHES
    assert prompts_per_call(Generate(batch_size=16, cuda_graphs=False), gpu=True) == 16
