# Two commands a new user needs: `make demo` and `make test`. Both create .venv on first use.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: demo test test-fast test-container lint format browser-deps install clean

install: $(STAMP)

# Reinstall only when the dependency list changes; editable install so code edits need nothing.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --progress-bar off -e '.[all,dev]' 2>&1 | grep -v 'is ignored: it is neither' || true
	$(PY) -c "import fashion_search, open_clip, faiss, fastapi, streamlit, playwright" 
	touch $(STAMP)

# The browser test drives Debian's Chromium (Playwright's own browser download needs the internet).
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian chromium for the browser tests"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

test: $(STAMP) browser-deps
	$(PY) -m pytest $(PYTEST_ARGS)

# Unit tests only (no CLI, server or browser processes; those live in integration/ and beyond): ~1.5 min on 2 cores.
test-fast: $(STAMP)
	$(PY) -m pytest tests/unit -m "not slow and not browser" $(PYTEST_ARGS)

# Build the image and serve a tiny index from it (podman; installed when missing, root): ~1-2 min once
# the base image and wheels are cached. Prints SKIP and succeeds only where no container can start.
test-container:
	python3 tests/container/smoke.py

demo: $(STAMP)
	$(VENV)/bin/fashion-search demo --dir demo

lint:
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format:
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) demo .pytest_cache
