# Every target builds .venv itself when it is missing or out of date.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
HOME_DIR := $(or $(INFER_HOME),var)
WEIGHTS  := $(or $(INFER_WEIGHTS_DIR),$(HOME_DIR)/weights)/.built
NAME   ?= cpu0
DEVICE ?= cpu

.PHONY: demo test unit integration lint bench bench-quick worker weights flower clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,peers]'
	touch $@

$(WEIGHTS): $(STAMP) models/registry.py models/loader.py $(wildcard models/zoo/*.py)
	$(PY) -m models build --force --dir $(dir $@)
	touch $@

weights: $(WEIGHTS)

demo: $(WEIGHTS)
	$(PY) -m tasks.demo

worker: $(WEIGHTS)
	$(PY) -m tasks.worker --name $(NAME) --device $(DEVICE)

flower: $(STAMP)
	$(PY) -m celery -A tasks flower --address=127.0.0.1 --port=5555

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

unit: $(WEIGHTS)
	$(PY) -m pytest tests/unit

integration: $(WEIGHTS)
	$(PY) -m pytest tests/integration

test: lint $(WEIGHTS)
	$(PY) -m pytest

# The benchmark compares against raw AMQP: local RabbitMQ + Redis unless the environment says otherwise.
BENCH_ENV := CELERY_BROKER_URL=$${CELERY_BROKER_URL:-amqp://guest:guest@127.0.0.1:5672//} \
	CELERY_RESULT_BACKEND=$${CELERY_RESULT_BACKEND:-redis://127.0.0.1:6379/0}

bench: $(WEIGHTS)
	$(BENCH_ENV) $(PY) -m benchmarks --json var/bench/latest.json

bench-quick: $(WEIGHTS)
	$(BENCH_ENV) $(PY) -m benchmarks --quick --json var/bench/quick.json

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
