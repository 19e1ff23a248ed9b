# glyphq: `make demo` and `make test` work on a fresh Debian/Ubuntu machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch comes first, on its own, from TORCH_INDEX: by default PyTorch's CPU index, so a CPU machine gets the
# CPU build (about 200 MB; PyPI's Linux wheel is the CUDA build, several GB). pip's own configuration
# (find-links, other indexes) still applies: where the index cannot be reached, pip retries it for about
# 15 s and then takes a torch it finds there, or fails rather than fetch a CUDA build.
# A GPU host: `make install GPU=1` (PyPI's CUDA build of torch, plus the glyph extra), or add
# TORCH_INDEX=https://download.pytorch.org/whl/cu128 for another CUDA version.
GPU ?= 0
ifeq ($(GPU),1)
TORCH ?= torch
TORCH_INDEX ?=
EXTRAS ?= worker,glyph,render,flower,gateway,test
else
TORCH ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
EXTRAS ?= worker,render,flower,gateway,test
endif
# The glyph extra's torchvision must match torch's build: it comes in the same step, from the same index.
TORCH_PACKAGES := $(TORCH)$(if $(and $(findstring glyph,$(EXTRAS)),$(if $(findstring torchvision,$(TORCH)),,x)), torchvision)
PYPI ?= https://pypi.org/simple
# Stamps named after what they installed: changing TORCH, TORCH_INDEX or EXTRAS installs again.
TORCH_STAMP := $(VENV)/.torch-$(shell printf '%s' '$(TORCH_PACKAGES)|$(TORCH_INDEX)' | cksum | cut -d' ' -f1)
STAMP := $(VENV)/.installed-$(shell printf '%s' '$(TORCH_PACKAGES)|$(TORCH_INDEX)|$(EXTRAS)' | cksum | cut -d' ' -f1)
# What step 1 installed, pinned for step 2, so that no extra can swap torch for another build.
TORCH_PINS := $(VENV)/torch-pins.txt

.PHONY: install torch redis test test-latest lint demo samples clean

$(PY):
	@echo "== creating $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(TORCH_STAMP): | $(PY)
	@echo "== [1/2] installing $(TORCH_PACKAGES) from $(or $(TORCH_INDEX),the default index) (the largest download)"
	@if ls $(VENV)/.torch-* >/dev/null 2>&1; then \
	  echo "== TORCH, TORCH_INDEX or the glyph extra changed: replacing the installed torch"; \
	  $(PY) -m pip uninstall -q -y torch torchvision; rm -f $(VENV)/.torch-*; fi
ifeq ($(TORCH_INDEX),)
	$(PY) -m pip install $(TORCH_PACKAGES)
else ifeq ($(findstring torchvision,$(TORCH_PACKAGES)),)
	$(PY) -m pip install --no-deps --index-url "$(TORCH_INDEX)" $(TORCH_PACKAGES)
	$(PY) -m pip install $(TORCH_PACKAGES)
else
	$(PY) -m pip install --index-url "$(TORCH_INDEX)" --extra-index-url "$(PYPI)" $(TORCH_PACKAGES)
endif
	$(PY) -m pip freeze | grep -E '^(torch|torchvision)==' > $(TORCH_PINS)
	touch $@

$(TORCH_PINS): | $(TORCH_STAMP)
	$(PY) -m pip freeze | grep -E '^(torch|torchvision)==' > $@

$(STAMP): $(TORCH_STAMP) $(TORCH_PINS) pyproject.toml constraints.txt
	@echo "== [2/2] installing glyphq[$(EXTRAS)] and its dependencies (versions from constraints.txt)"
	$(PY) -m pip install -c constraints.txt -c $(TORCH_PINS) -e ".[$(EXTRAS)]"
	rm -f $(VENV)/.installed*
	touch $@
	@echo "== installed: $$(tr '\n' ' ' < $(TORCH_PINS))($(or $(TORCH_INDEX),default index)), glyphq[$(EXTRAS)] in $(VENV)"

install: $(STAMP)

# Step 1 alone (test-latest runs it for its own venv).
torch: $(TORCH_STAMP) $(TORCH_PINS)

redis:
	@command -v redis-server >/dev/null || scripts/install-redis.sh

# mypy finds the checkout as the package glyphq through this link (pyproject.toml: mypy_path).
lint: install
	$(PY) -m ruff check .
	mkdir -p $(VENV)/mypy-path && ln -sfn "$(CURDIR)" $(VENV)/mypy-path/glyphq
	$(PY) -m mypy

test: install redis lint
	$(PY) -m pytest -m "not slow and not gpu"

# The engine tests on the newest releases pyproject.toml allows (transformers above all), without
# constraints.txt, in a venv of their own: a release that breaks the worker fails here before a user's
# `pip install 'glyphq[worker]'` meets it. torch is installed as for .venv (step 1) and kept; every other
# dependency is upgraded on each run. docs/development.md says what to do with a failure.
LATEST_VENV ?= .venv-latest
LATEST_PY := $(LATEST_VENV)/bin/python
ENGINE_TESTS ?= tests/test_paged.py tests/test_blocks.py tests/test_prefix.py tests/test_paged_worker.py tests/test_engine.py tests/test_continuous.py tests/test_batching.py \
	tests/test_scheduler.py tests/test_admission.py tests/test_private.py \
	tests/test_handover.py tests/test_glyph.py

test-latest: redis
	$(MAKE) --no-print-directory VENV=$(LATEST_VENV) torch
	@echo "== installing glyphq[$(EXTRAS)] with the newest versions pyproject.toml allows (no constraints.txt)"
	$(LATEST_PY) -m pip install -q --upgrade --upgrade-strategy eager -c $(LATEST_VENV)/torch-pins.txt -e ".[$(EXTRAS)]"
	@echo "== testing with: $$($(LATEST_PY) -m pip freeze | grep -iE '^(torch|transformers|accelerate|tokenizers|safetensors|huggingface.hub|celery|kombu)==' | tr '\n' ' ')"
	$(LATEST_PY) -m pytest -m "not slow and not gpu" $(ENGINE_TESTS)

demo: install
	scripts/demo.sh

samples: install
	$(PY) scripts/make_samples.py samples

clean:
	rm -rf $(VENV) $(LATEST_VENV) .demo .pytest_cache .ruff_cache .mypy_cache

# Soak: 20,000 jobs through a real redis-server and worker on the tiny model (about an hour on 2 cores);
# prints the figures and writes bench/results/soak.json. Not part of `make test` (marker `slow`).
.PHONY: soak
soak: install redis
	$(PY) -m pytest -m slow tests/soak -s -p no:cacheprovider
