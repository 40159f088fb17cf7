"""The LightningModule's optimizer wiring for fine-tuning: backbone LR and a frozen backbone."""

from __future__ import annotations

from functools import partial

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from resnet_lightning.models import create_model
from resnet_lightning.module import ImageClassifier


def classifier(**kwargs) -> ImageClassifier:
    net = create_model("resnet20", freeze_backbone=kwargs.pop("freeze_backbone", False))
    sgd = partial(torch.optim.SGD, lr=0.1, momentum=0.9)
    return ImageClassifier(net, sgd, **kwargs)


def fit_two_steps(module: ImageClassifier) -> None:
    images, labels = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=loader)


def test_backbone_gets_its_own_learning_rate():
    module = classifier(backbone_lr_scale=0.1)
    optimizer = module.configure_optimizers()
    head, backbone = optimizer.param_groups
    assert head["lr"] == 0.1 and abs(backbone["lr"] - 0.01) < 1e-12
    assert {id(p) for p in head["params"]} == {id(p) for p in module.net.fc.parameters()}
    n_params = sum(1 for _ in module.net.parameters())
    assert len(head["params"]) + len(backbone["params"]) == n_params


def test_onecycle_keeps_the_backbone_scale():
    module = classifier(
        backbone_lr_scale=0.1,
        scheduler=partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.4),
        scheduler_interval="step",
    )
    fit_two_steps(module)
    scheduler = module.lr_schedulers()
    assert scheduler.total_steps == 2
    head_max, backbone_max = (g["max_lr"] for g in scheduler.optimizer.param_groups)
    assert head_max == 0.4 and abs(backbone_max - 0.04) < 1e-12


def test_frozen_backbone_trains_the_head_alone_and_keeps_bn_statistics():
    module = classifier(freeze_backbone=True)
    before = {k: v.clone() for k, v in module.net.state_dict().items()}
    fit_two_steps(module)
    after = module.net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"fc.weight", "fc.bias"}, changed  # running_mean/var included
