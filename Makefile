# glyphq: `make demo` and `make test` work on a fresh Debian/Ubuntu machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On CPU machines this exact version is a CPU build; any other request downloads CUDA wheels.
# A GPU host overrides it, e.g. `make install TORCH=torch`.
TORCH ?= torch==2.13.0
EXTRAS ?= worker,render,test,flower,examples

.PHONY: install redis test lint demo samples clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

redis:
	@command -v redis-server >/dev/null || scripts/install-redis.sh

lint: install
	$(PY) -m ruff check .
	$(PY) -m mypy

test: install redis lint
	$(PY) -m pytest -m "not slow and not gpu"

demo: install
	scripts/demo.sh

samples: install
	$(PY) scripts/make_samples.py samples

clean:
	rm -rf $(VENV) .demo .pytest_cache .ruff_cache .mypy_cache

# Soak: 2,000 jobs through a real redis-server and worker on the tiny model (about 5 minutes on 2 cores);
# prints the figures and writes bench/results/soak.json. Not part of `make test` (marker `slow`).
.PHONY: soak
soak: install redis
	$(PY) -m pytest -m slow tests/soak -s -p no:cacheprovider
