# One-command set-up: every target below creates .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The default is PyPI's CUDA build of torch (about 5.5 GB installed; it runs on a CPU too). On a
# machine without a GPU, a CPU build is a tenth of that:
#   make install TORCH_SPEC="torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
ARGS ?=
# Use the CIFAR-10 copy beside the checkout when there is one (no download needed).
SHARED_CIFAR := $(abspath ../shared/data/cifar10-jpeg.tar.gz)
ifneq ($(wildcard $(SHARED_CIFAR)),)
export CIFAR10_PATH ?= $(SHARED_CIFAR)
endif

.PHONY: install train test test-all lint bench tensorboard dashboard sweep-hyperband clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "Installing $(TORCH_SPEC) into $(VENV)/ (the CUDA build: about 5.5 GB, minutes on a slow link; TORCH_SPEC in the Makefile for a CPU-only build)"
	$(PY) -m pip install --progress-bar on $(TORCH_SPEC)
	@echo "Installing resnet-lightning and its extras (dev, sweep, export, mlflow, wandb) into $(VENV)/"
	$(PY) -m pip install -q -e '.[dev,sweep,export,mlflow,wandb]'
	@# The Optuna sweeper is this project's now (hydra_plugins/); the old plugin pinned optuna<3
	@# and registered the same hydra/sweeper=optuna.
	$(PY) -m pip uninstall -q -y hydra-optuna-sweeper
	@echo "Done. Run commands with $(PY) (or 'source $(VENV)/bin/activate' first)"
	touch $@

install: $(VENV)/.installed

train: install
	$(PY) -m resnet_lightning $(ARGS)

# The suite less its slow tier (multi-process DDP and torchrun runs, benchmarks, whole recipes,
# real time budgets; `-m slow` in tests/): what a newcomer runs. test-all runs every test, and
# is what CI runs (.ci/run).
test: install
	$(PY) -m pytest -m "not slow" $(ARGS)

test-all: install
	$(PY) -m pytest $(ARGS)

lint: install
	$(PY) -m ruff check resnet_lightning hydra_plugins tests
	$(PY) -m ruff format --check resnet_lightning hydra_plugins tests

bench: install
	$(PY) -m resnet_lightning.bench $(ARGS)

# The same 16-trial Optuna search without and with Hyperband pruning, on the same seeds; each
# in a sweep directory of its own, its seconds printed (docs/experiments.md, "Pruning with
# Hyperband").
HYPERBAND_SEARCH := hparams_search=optuna model=resnet20 trainer=cpu trainer.max_epochs=9 \
	trainer.limit_train_batches=4 trainer.limit_val_batches=4 trainer.limit_test_batches=10 \
	data.batch_size=128 seed=0 hydra.sweeper.sampler.seed=0 hydra.sweeper.n_trials=16

sweep-hyperband: install
	@for pruner in none hyperband; do \
	  dir=outputs/multirun/hyperband_$${pruner}_$$(date +%Y-%m-%d_%H-%M-%S); \
	  choice=$$([ $$pruner = none ] || echo hydra/sweeper/pruner=$$pruner); \
	  start=$$(date +%s); \
	  $(PY) -m resnet_lightning $(HYPERBAND_SEARCH) $$choice hydra.sweep.dir=$$dir $(ARGS) || exit 1; \
	  echo "pruner $$pruner: $$(( $$(date +%s) - start )) s; $$dir/optimization_results.yaml"; \
	  $(PY) -m resnet_lightning.report $$dir || exit 1; \
	done

tensorboard: install
	$(PY) -m tensorboard.main --logdir outputs $(ARGS)

# optuna-dashboard over a sweep's study: ARGS="outputs/multirun/<date>_optuna" (or a storage
# URL or journal file; --port, --host)
dashboard: install
	$(PY) -m resnet_lightning.dashboard $(ARGS)

clean:
	rm -rf outputs/* .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
