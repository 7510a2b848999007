# make demo: set up .venv and run the default job. make test: set up .venv and run the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test setup lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch 2.13.0: the CPU build when no NVIDIA GPU is present (any other version pulls CUDA wheels).
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[lora,test]"
	touch $(STAMP)

setup: $(STAMP)

data/sample/support.jsonl: | $(STAMP)
	$(BIN)/aigc-ray sample-data data/sample

demo: $(STAMP) data/sample/support.jsonl
	$(BIN)/aigc-ray data
	$(BIN)/aigc-ray train
	$(BIN)/aigc-ray serve runs/tiny-cpu --once "$$(printf 'Customer: How do I reset my password for Nimbus Drive?\nAgent:')"

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 tests

lint: $(STAMP)
	$(BIN)/ruff check aigc_ray tests benchmarks

bench: $(STAMP) data/sample/support.jsonl
	$(BIN)/python benchmarks/data_throughput.py
	$(BIN)/python benchmarks/packing_throughput.py
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/feed_rate.py
	$(BIN)/python benchmarks/tune_efficiency.py
	$(BIN)/python benchmarks/serve_throughput.py
	$(BIN)/python benchmarks/generate_throughput.py

clean:
	rm -rf runs data/sample
