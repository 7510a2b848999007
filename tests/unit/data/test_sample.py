"""The sample corpus's lm-evaluation-harness tasks: well-formed documents, YAMLs lm-eval reads
from any folder."""

import json
from pathlib import Path

from aigc_ray.data.sample import HARNESS_DOCS, write_sample_corpus
from aigc_ray.harness import harness_spec


def test_the_harness_tasks_are_well_formed_and_readable_from_any_folder(tmp_path, monkeypatch):
    written = write_sample_corpus(tmp_path / "sample", num_pairs=50)
    tasks = written["harness"]
    monkeypatch.chdir(tmp_path)  # not the tasks' folder: their data paths must not depend on it
    spec = harness_spec(str(tmp_path / "sample" / "harness"), None, None)
    assert sorted(config["task"] for config in spec.tasks) == \
        ["support_choice", "support_reply", "support_text"]
    for config in spec.tasks:
        [data] = config["dataset_kwargs"]["data_files"].values()
        assert Path(data).is_absolute() and Path(data).is_file()

    choice = [json.loads(line) for line in
              Path(tasks["choice"]).with_suffix(".jsonl").read_text().splitlines()]
    assert len(choice) == HARNESS_DOCS
    for doc in choice:
        assert len(set(doc["choices"])) == 4 and 0 <= doc["answer"] < 4
    # The right answer sits at every position, not always the first.
    assert {doc["answer"] for doc in choice} == {0, 1, 2, 3}
