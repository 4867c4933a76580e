# Every target builds .venv itself when it is missing or out of date.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
HOME_DIR := $(or $(INFER_HOME),var)
WEIGHTS  := $(or $(INFER_WEIGHTS_DIR),$(HOME_DIR)/weights)/.built
NAME   ?= cpu0
DEVICE ?= cpu

.PHONY: browser prometheus-bin netns-tools multihost demo test unit integration reliability chaos lint bench bench-quick celery-batches-venv worker weights flower exporter clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,peers,models]'
	touch $@

$(WEIGHTS): $(STAMP) models/loader.py $(wildcard models/zoo/*.py models/zoo/repository/*/model.toml)
	$(PY) -m models build --force --dir $(dir $@)
	touch $@

weights: $(WEIGHTS)

demo: $(WEIGHTS)
	$(PY) -m tasks.ops.demo

worker: $(WEIGHTS)
	$(PY) -m tasks.worker --name $(NAME) --device $(DEVICE)

# Needs FLOWER_BASIC_AUTH=user:password (refused when unset or a placeholder); 127.0.0.1 only.
flower: $(STAMP)
	$(PY) -m tasks.ops.flower --address=127.0.0.1 --port=5555

# The queue exporter (tasks/ops/exporter.py) on 127.0.0.1:9809/metrics: per queue, ready messages,
# consumers, oldest-message age, service rate and expected drain time (needs RabbitMQ and Redis).
exporter: $(STAMP)
	$(PY) -m tasks.ops.exporter

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

unit: $(WEIGHTS)
	$(PY) -m pytest tests/unit

integration: $(WEIGHTS) browser prometheus-bin
	$(PY) -m pytest tests/integration

test: lint $(WEIGHTS) browser prometheus-bin netns-tools
	$(PY) -m pytest

# Debian's Chromium for the Flower screenshot test (tests/integration/test_flower.py).  Where
# it cannot be installed (not root, no package index) that one test skips and says why.
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
		|| echo "make: could not install Debian's chromium (needs root and apt): the browser test will skip"

# Debian's prometheus for tests/integration/test_prometheus.py: it scrapes real workers and the
# queue exporter and evaluates every Grafana dashboard query.  Where it cannot be installed that
# test skips and says why (with INFER_PROMETHEUS_REQUIRED=1, as in CI, it fails instead).
prometheus-bin:
	@command -v prometheus >/dev/null || { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } \
		|| echo "make: could not install Debian's prometheus (needs root and apt): the Prometheus test will skip"

# Debian's nftables for the multihost tier's one-way drops and loss (tests/multihost); iproute2
# (ip netns) is already there.  Without root or a package index the tier skips and says why.
netns-tools:
	@command -v nft >/dev/null || { apt-get update -qq && apt-get install -y -qq nftables >/dev/null; } \
		|| echo "make: could not install Debian's nftables (needs root and apt): the multihost tier will skip"

# Eight test hosts in network namespaces, a 3-node RabbitMQ cluster, the seven fault scenarios at
# full load (`make test` runs them reduced); ledgers in var/multihost/.
multihost: $(WEIGHTS) netns-tools
	INFER_MULTIHOST=full $(PY) -m pytest tests/multihost -s

# The full fault suite (10,000-task soak); `make test` runs the reduced counts.
reliability: $(WEIGHTS)
	INFER_RELIABILITY=full $(PY) -m pytest tests/reliability -s

# The benchmark compares against raw AMQP: local RabbitMQ + Redis unless the environment says otherwise.
BENCH_ENV := CELERY_BROKER_URL=$${CELERY_BROKER_URL:-amqp://guest:guest@127.0.0.1:5672//} \
	CELERY_RESULT_BACKEND=$${CELERY_RESULT_BACKEND:-redis://127.0.0.1:6379/0}

# celery-batches pins celery < 5.7: it gets its own environment, used by the bench when present.
CB_VENV := .venv-celery-batches
$(CB_VENV)/.installed:
	test -x $(CB_VENV)/bin/python || $(PYTHON) -m venv $(CB_VENV)
	$(CB_VENV)/bin/python -m pip install --quiet "celery[redis,msgpack]==5.6.3" "celery-batches==0.11" \
		"torch==2.13.0" "numpy==2.4.6" "safetensors==0.8.0"
	touch $@

celery-batches-venv: $(CB_VENV)/.installed

bench: $(WEIGHTS)
	$(BENCH_ENV) BENCH_CELERY_BATCHES_PYTHON=$$(test -x $(CB_VENV)/bin/python && echo $(CB_VENV)/bin/python) \
		$(PY) -m benchmarks --producers 1 --json var/bench/latest.json

# 10,000 tasks at once: drain time, p99 and 0 lost, as lane "burst" in the benchmark JSON.
chaos: $(WEIGHTS)
	$(BENCH_ENV) $(PY) -m benchmarks burst --json var/bench/latest.json

bench-quick: $(WEIGHTS)
	$(BENCH_ENV) $(PY) -m benchmarks --quick --producers 1 --json var/bench/quick.json

clean:
	rm -rf $(VENV) $(CB_VENV) var .pytest_cache .mypy_cache .ruff_cache
