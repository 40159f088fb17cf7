# One-command set-up: every target below creates .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
ARGS ?=
# Use the CIFAR-10 copy beside the checkout when there is one (no download needed).
SHARED_CIFAR := $(abspath ../shared/data/cifar10-jpeg.tar.gz)
ifneq ($(wildcard $(SHARED_CIFAR)),)
export CIFAR10_PATH ?= $(SHARED_CIFAR)
endif

.PHONY: install train test lint bench tensorboard clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev,sweep,export]'
	touch $@

install: $(VENV)/.installed

train: install
	$(PY) -m resnet_lightning $(ARGS)

test: install
	$(PY) -m pytest $(ARGS)

lint: install
	$(PY) -m ruff check resnet_lightning tests
	$(PY) -m ruff format --check resnet_lightning tests

bench: install
	$(PY) -m resnet_lightning.bench $(ARGS)

tensorboard: install
	$(PY) -m tensorboard.main --logdir outputs $(ARGS)

clean:
	rm -rf outputs/* .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
