"""Every experiment recipe composes to what its paper says and runs a few real steps.

`experiment=degradation` (a multirun by itself) runs in test_reports.py, whose reports read it.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import hydra
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from tests.cli_harness import CONFIG_DIR, REPO, TINY, compose_config, run_cli

EXPERIMENTS = sorted(p.stem for p in Path(CONFIG_DIR, "experiment").glob("*.yaml"))
# The single-run recipes of this project's papers, run for one step each below.
RECIPES = [
    "cpu_quick",
    "fast94",
    "paper_cifar",
    "preact_resnet164",
    "wrn28_10",
    "resnext29_8x64d",
    "densenet_bc100",
    "finetune_pretrained",
    "resnet18_modern",
    "wrn28_10_modern",
]
FIGURE_CALLBACKS = (
    "confusion_matrix",
    "augmented_images",
    "stage_grad_norms",
    "parameter_distribution",
)


def compose_with_hydra(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    cfg = compose_config([f"experiment={experiment}"])
    assert cfg.model.name and cfg.optimizer.lr > 0 and cfg.data.batch_size > 0


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_recipe_key_is_an_argument_of_its_constructor(experiment):
    # Composition merges a recipe's keys without checking them: a misspelt one would only
    # fail when the run builds its objects.
    cfg = compose_config([f"experiment={experiment}"])
    for group in ("data", "module", "optimizer", "scheduler"):
        node = cfg[group]
        if node is None:
            continue
        target = hydra.utils.get_object(node._target_)
        accepted = set(inspect.signature(target).parameters)
        keys = {k for k in node if not k.startswith("_")}
        assert keys <= accepted, f"{experiment}: {group}.{sorted(keys - accepted)}"


def test_paper_cifar_is_the_papers_iteration_schedule_for_any_depth():
    cfg = compose_config(["experiment=paper_cifar", "model=plain56"])
    assert cfg.model.name == "plain56"  # the command line picks the network
    assert (cfg.trainer.max_steps, cfg.trainer.max_epochs) == (64000, -1)
    assert list(cfg.scheduler.milestones) == [32000, 48000] and cfg.scheduler.gamma == 0.1
    assert cfg.module.scheduler_interval == "step"
    assert (cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay) == (
        0.1,
        0.9,
        1e-4,
    )
    assert (cfg.data.batch_size, cfg.data.val_size, cfg.data.augment) == (128, 5000, True)
    assert compose_config(["experiment=paper_cifar"]).model.name == "resnet20"


@pytest.mark.parametrize(
    "experiment, model, optimizer, schedule, batch, length",
    [
        # name, (lr, momentum, nesterov, weight decay), (milestones, gamma), batch, (epochs, steps)
        ("wrn28_10", "wrn28_10", (0.1, 0.9, True, 5e-4), ([60, 120, 160], 0.2), 128, (200, -1)),
        ("resnext29_8x64d", "resnext29_8x64d", (0.1, 0.9, False, 5e-4), ([150, 225], 0.1), 128,
         (300, -1)),
        ("densenet_bc100", "densenet_bc100", (0.1, 0.9, True, 1e-4), ([150, 225], 0.1), 64,
         (300, -1)),
        ("preact_resnet164", "preact_resnet164", (0.1, 0.9, False, 1e-4), ([32000, 48000], 0.1),
         128, (-1, 64000)),
    ],
)  # fmt: skip
def test_family_recipes_are_their_papers(experiment, model, optimizer, schedule, batch, length):
    cfg = compose_config([f"experiment={experiment}"])
    assert cfg.model.name == model
    opt = cfg.optimizer
    assert (opt.lr, opt.momentum, opt.nesterov, opt.weight_decay) == optimizer
    assert (list(cfg.scheduler.milestones), cfg.scheduler.gamma) == schedule
    assert cfg.data.batch_size == batch
    assert (cfg.trainer.max_epochs, cfg.trainer.max_steps) == length


def test_degradation_is_one_multirun_over_plain_and_residual_nets():
    cfg = compose_with_hydra(["experiment=degradation"])
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.hydra.sweeper.params.model.split(",") == [
        "plain20",
        "plain56",
        "resnet20",
        "resnet56",
    ]
    assert cfg.trainer.max_steps == 64000  # each job is paper_cifar


def test_modern_recipes_are_their_sources():
    # Müller & Hutter 2021's CIFAR setup: SGD Nesterov 0.1, wd 5e-4, batch 128, cosine over
    # 200 epochs, TrivialAugment then a 16 px cutout; both add warm-up and the weights' EMA.
    for experiment, model in (("wrn28_10_modern", "wrn28_10"), ("resnet18_modern", "resnet18")):
        cfg = compose_config([f"experiment={experiment}"])
        opt, data = cfg.optimizer, cfg.data
        assert cfg.model.name == model
        assert (opt.lr, opt.momentum, opt.nesterov, opt.weight_decay) == (0.1, 0.9, True, 5e-4)
        assert (data.batch_size, data.policy, data.cutout, data.augment) == (
            128,
            "trivialaugment",
            16,
            True,
        )
        assert cfg.scheduler._target_.endswith("CosineAnnealingLR")
        assert cfg.trainer.max_epochs == cfg.scheduler.T_max == 200
        assert cfg.callbacks.ema.decay == 0.999 and cfg.module.warmup_epochs == 1
    modern = compose_config(["experiment=resnet18_modern"])
    assert (modern.model.stem, modern.module.label_smoothing, modern.module.no_decay_bn_bias) == (
        "cifar",
        0.1,
        True,
    )


def test_imagenet_recipe_is_torchvisions_reference():
    cfg = compose_config(["experiment=imagenet_resnet50"])
    opt, data = cfg.optimizer, cfg.data
    assert (cfg.model.name, cfg.model.stem) == ("resnet50", "imagenet")
    assert (opt.lr, opt.momentum, opt.weight_decay, cfg.module.lr_reference_batch) == (
        0.1,
        0.9,
        1e-4,
        256,
    )
    assert (list(cfg.scheduler.milestones), cfg.scheduler.gamma, cfg.trainer.max_epochs) == (
        [30, 60],
        0.1,
        90,
    )
    assert (data.image_size, data.resize_size, data.batch_size) == (224, 256, 32)
    assert cfg.trainer.strategy == "ddp"


def test_finetune_pretrained_loads_weights_into_a_new_10_class_head(tmp_path):
    # Offline there are no torchvision downloads: a torchvision ResNet-50 state dict saved to a
    # file goes through the same loading path as IMAGENET1K_V1.
    from torchvision.models import resnet50

    reference = resnet50()
    weights_file = tmp_path / "resnet50.pth"
    torch.save(reference.state_dict(), weights_file)
    cfg = compose_config(["experiment=finetune_pretrained", f"model.pretrained={weights_file}"])
    assert (cfg.data.image_size, cfg.data.normalization, cfg.model.stem) == (
        224,
        "imagenet",
        "imagenet",
    )
    assert compose_config(["experiment=finetune_pretrained"]).model.pretrained == "IMAGENET1K_V1"
    model = instantiate(cfg.model)
    assert torch.equal(model.layer4[2].conv3.weight, reference.layer4[2].conv3.weight)
    assert model.fc.out_features == 10


def test_hparams_search_composes_when_the_launcher_is_installed():
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="pip install -e '.[sweep]'")
    cfg = compose_with_hydra(["hparams_search=optuna", "hydra/launcher=parallel"])
    assert cfg.hydra.sweeper.direction == "maximize" and cfg.optimized_metric == "val/acc"
    assert "optimizer.lr" in cfg.hydra.sweeper.params
    assert cfg.hydra.sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert cfg.hydra.sweeper.pruner is None
    assert cfg.hydra.launcher.n_jobs == 2


def test_sweeper_sampler_and_pruner_are_chosen_by_name():
    choices = ["hparams_search=optuna", "hydra/sweeper/sampler=cmaes"]
    cfg = compose_with_hydra([*choices, "hydra/sweeper/pruner=hyperband"])
    assert cfg.hydra.sweeper.sampler == {
        "_target_": "optuna.samplers.CmaEsSampler",
        "seed": 1234,
        "n_startup_trials": 1,
    }
    assert cfg.hydra.sweeper.pruner._target_ == "optuna.pruners.HyperbandPruner"


@pytest.mark.slow  # make test-all
def test_recipes_run_a_few_steps(tmp_path, data_overrides):
    # One multirun: one process start for all recipes. One step of two 32 px images each keeps
    # the 36M-parameter WRN and ResNeXt and the 224 px fine-tuning quick; checkpoints and
    # figures (test_reports.py checks those) would only add disk and plotting time.
    sweep_dir = tmp_path / "recipes"
    quiet = [f"callbacks.{name}=null" for name in ("model_checkpoint", *FIGURE_CALLBACKS)]
    run_cli(
        [
            "-m",
            f"experiment={','.join(RECIPES)}",
            *TINY,
            *data_overrides,
            *quiet,
            "model.pretrained=null",
            "data.batch_size=2",
            "data.image_size=32",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=1",
            "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1",
            "trainer.num_sanity_val_steps=0",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=REPO,
    )
    for number, experiment in enumerate(RECIPES):
        job = sweep_dir / str(number)
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        assert f"experiment={experiment}" in overrides
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["steps"] == 1 and 0.0 <= metrics["test/acc"] <= 1.0
        config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        expected = compose_config([f"experiment={experiment}"])
        assert config["model"]["name"] == expected.model.name
        assert config["optimizer"]["weight_decay"] == expected.optimizer.weight_decay
