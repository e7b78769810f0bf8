PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,onnx,docs,tracking]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/dnis demo configs/synthetic-ctr-fm-dnis.yaml configs/movielens-rating-mf.yaml configs/movielens-ctr-deepfm.yaml configs/movielens-topk-bprmf.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

# Roughly shortest first (minutes) to longest (hours on 2 cores); each writes its own section of
# docs/performance.md or docs/results.md.
bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/search_vs_train.py
	$(BIN)/python benchmarks/compile_speedup.py
	$(BIN)/python benchmarks/inference_latency.py
	$(BIN)/python benchmarks/embedding_step.py
	$(BIN)/python benchmarks/topk_eval.py
	$(BIN)/python benchmarks/quality_vs_peers.py
	$(BIN)/python benchmarks/throughput_peers.py
	$(BIN)/python benchmarks/streaming_rss.py

clean:
	rm -rf $(VENV) runs build dist site src/*.egg-info

# The documentation site, built into site/ without network (the docs extra is installed once).
.PHONY: docs
docs: $(STAMP)
	$(BIN)/python -c "import mkdocs, material, mkdocstrings_handlers.python" 2>/dev/null || $(BIN)/pip install --quiet -e '.[docs]'
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site
