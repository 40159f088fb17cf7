"""The LightningModule: optimizer wiring for fine-tuning (backbone LR, frozen backbone), the
epoch loss; and the divergence guard that stops its training."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from resnet_lightning.callbacks.divergence import DivergenceGuard
from resnet_lightning.errors import InvalidArgument, TrainingDivergedError
from resnet_lightning.models import create_model
from resnet_lightning.training.module import ImageClassifier


def classifier(**kwargs) -> ImageClassifier:
    net = create_model("resnet20", freeze_backbone=kwargs.pop("freeze_backbone", False))
    sgd = partial(torch.optim.SGD, lr=0.1, momentum=0.9)
    return ImageClassifier(net, sgd, **kwargs)


def fit_on_random_images(module: ImageClassifier, batch_size: int, **trainer_args) -> None:
    """Fit on 16 random images, with a bare Trainer (no logger, checkpoints or bars)."""
    images, labels = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=batch_size)
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_args,
    )
    trainer.fit(module, train_dataloaders=loader)


def fit_two_steps(module: ImageClassifier) -> None:
    fit_on_random_images(module, batch_size=8, max_steps=2)


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


def test_epoch_loss_counts_each_image_once():
    module = classifier()
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=3)  # batches of 3 and 1
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    (metrics,) = trainer.validate(module, dataloaders=loader)
    module.eval()
    with torch.no_grad():
        per_image = torch.nn.functional.cross_entropy(module(images), labels, reduction="none")
        batch_means = [per_image[:3].mean(), per_image[3:].mean()]
    assert abs(metrics["val/loss"] - per_image.mean().item()) < 1e-5
    assert abs(per_image.mean() - sum(batch_means) / 2) > 1e-4  # the two means differ here


@pytest.mark.parametrize(("val_check_interval", "log_every"), [(None, 50), (3, 50), (None, 0)])
def test_divergence_between_log_steps_stops_before_any_checkpoint(
    tmp_path, val_check_interval, log_every
):
    images, labels = torch.randn(48, 3, 32, 32), torch.randint(0, 10, (48,))
    images[8:16] = float("nan")  # the second of six batches of 8
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)
    # Without the check before validation, validating after batch 3 would save a checkpoint.
    val_loader = loader if val_check_interval else None
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=3,
        log_every_n_steps=log_every,
        logger=False,
        val_check_interval=val_check_interval,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        default_root_dir=tmp_path,
        callbacks=[DivergenceGuard()],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    stop = 3 if val_check_interval else 5  # validation after 3 steps, or the epoch's last batch
    with pytest.raises(
        TrainingDivergedError, match=f"became nan at step 1; training stopped at step {stop} "
    ):
        trainer.fit(classifier(), train_dataloaders=loader, val_dataloaders=val_loader)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_divergence_before_an_early_stop_still_fails_the_run(tmp_path):
    class StopAfterThreeSteps(L.Callback):  # as max_time or EarlyStopping stop a run
        def on_train_batch_end(self, trainer, *args) -> None:
            trainer.should_stop = trainer.global_step >= 3

    images, labels = torch.randn(48, 3, 32, 32), torch.randint(0, 10, (48,))
    images[8:16] = float("nan")
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=3,
        log_every_n_steps=50,
        logger=False,
        callbacks=[DivergenceGuard(), StopAfterThreeSteps()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(TrainingDivergedError, match="became nan at step 1; training stopped"):
        trainer.fit(classifier(), train_dataloaders=loader)


def test_warmup_before_onecycle_is_refused():
    with pytest.raises(InvalidArgument, match="warmup_epochs=1.*pct_start"):
        classifier(
            scheduler=partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.4),
            scheduler_interval="step",
            warmup_epochs=1,
        )


def test_learning_rate_scales_with_the_global_batch(caplog):
    module = classifier(lr_reference_batch=64)
    seen = []

    class RecordLr(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    # 8 images a step, two steps accumulated: a global batch of 16, a quarter of 64.
    fit_on_random_images(
        module, batch_size=8, max_steps=1, accumulate_grad_batches=2, callbacks=[RecordLr()]
    )
    assert seen == pytest.approx([0.025, 0.025])
    assert "a global batch of 16 (8 x 1 processes x 2 accumulated)" in caplog.text


def test_bad_reference_batch_is_refused():
    with pytest.raises(InvalidArgument, match="lr_reference_batch=0 must be positive"):
        classifier(lr_reference_batch=0)


# airbench's norm-bias learning rate and test-time translations


def batch_norm_biases(net: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [m.bias for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def groups_by_kind(module: ImageClassifier) -> list[str]:
    """What each optimizer group holds: "bn.bias" (BatchNorm shifts alone), "fc" (the head
    alone) or "rest"."""
    shifts = {id(p) for p in batch_norm_biases(module.net)}
    head = {id(p) for p in module.net.fc.parameters()}
    kinds = []
    for group in module.optimizers().optimizer.param_groups:
        held = {id(p) for p in group["params"]}
        kinds.append("bn.bias" if held <= shifts else "fc" if held <= head else "rest")
    return kinds


def decaying_classifier(**kwargs) -> ImageClassifier:
    sgd = partial(torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return ImageClassifier(create_model("resnet20"), sgd, **kwargs)


def test_norm_biases_get_a_scaled_lr_and_the_same_decay_per_step():
    module = decaying_classifier(norm_bias_lr_scale=64)
    optimizer = module.configure_optimizers()
    rest, shifts = optimizer.param_groups
    biases = batch_norm_biases(module.net)
    assert {id(p) for p in shifts["params"]} == {id(p) for p in biases}
    assert len(rest["params"]) + len(biases) == len(list(module.net.parameters()))
    assert (rest["lr"], rest["weight_decay"]) == (0.1, 5e-4)
    assert shifts["lr"] == pytest.approx(6.4) and shifts["weight_decay"] == pytest.approx(5e-4 / 64)
    assert shifts["lr"] * shifts["weight_decay"] == pytest.approx(rest["lr"] * rest["weight_decay"])


def test_norm_bias_scale_composes_with_the_other_groups_and_onecycle():
    """Head and backbone lr, no decay on norms and biases, the batch's lr scaling and
    OneCycle's max_lr per group, all with the BatchNorm shifts 64x faster."""
    module = decaying_classifier(
        norm_bias_lr_scale=64,
        backbone_lr_scale=0.1,
        no_decay_bn_bias=True,
        lr_reference_batch=16,  # batches of 8: everything x 0.5
        scheduler=partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.4),
        scheduler_interval="step",
    )
    fit_on_random_images(module, batch_size=8, max_steps=1)
    groups = module.optimizers().optimizer.param_groups
    kinds = groups_by_kind(module)
    # head decayed, head spared (fc.bias), backbone decayed, backbone spared, its BN shifts
    assert kinds == ["fc", "fc", "rest", "rest", "bn.bias"]
    max_lrs = [g["max_lr"] for g in groups]
    assert max_lrs == pytest.approx([0.2, 0.2, 0.02, 0.02, 0.02 * 64])
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0, 5e-4, 0.0, 0.0]


def test_a_real_step_moves_norm_biases_by_the_scaled_amount():
    """Plain SGD: each parameter moves by -lr (grad + wd p); the BatchNorm shifts by
    -lr (64 grad + wd p)."""
    torch.manual_seed(0)
    sgd = partial(torch.optim.SGD, lr=0.01, weight_decay=5e-4)
    module = ImageClassifier(create_model("resnet20"), sgd, norm_bias_lr_scale=64)
    optimizer = module.configure_optimizers()
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    before = {n: p.detach().clone() for n, p in module.net.named_parameters()}
    module.criterion(module(images), labels).backward()
    grads = {n: p.grad.clone() for n, p in module.net.named_parameters()}
    optimizer.step()
    shifts = {id(p) for p in batch_norm_biases(module.net)}
    for name, param in module.net.named_parameters():
        factor = 64 if id(param) in shifts else 1
        expected = before[name] - 0.01 * (factor * grads[name] + 5e-4 * before[name])
        torch.testing.assert_close(param.detach(), expected, rtol=1e-5, atol=1e-7)


class Asymmetric(torch.nn.Module):
    """Logits that change with every shift and mirror of the image: a linear map of it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("flip", [False, True])
def test_test_time_translations_weigh_the_views_as_airbench(flip):
    torch.manual_seed(0)
    net = Asymmetric()
    module = ImageClassifier(net, torch.optim.SGD, test_time_flip=flip, test_time_translate=1)
    x = torch.randn(4, 3, 8, 8)
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    down_right, up_left = padded[..., :8, :8], padded[..., 2:, 2:]
    # The shifted images, pixel by pixel: down-right takes its pixel (i, j) from (i-1, j-1).
    assert torch.equal(down_right[..., 1:, 1:], x[..., :-1, :-1])
    assert torch.equal(up_left[..., :-1, :-1], x[..., 1:, 1:])
    assert torch.equal(down_right[..., 0, 1:], x[..., 1, :-1])  # reflected: row -1 is row 1

    def views(image):
        return (net(image) + net(image.flip(-1))) / 2 if flip else net(image)

    expected = 0.5 * views(x) + 0.25 * views(down_right) + 0.25 * views(up_left)
    with torch.no_grad():
        torch.testing.assert_close(module.predict_logits(x), expected.detach())
        plain = ImageClassifier(net, torch.optim.SGD, test_time_flip=flip)
        assert not torch.allclose(plain.predict_logits(x), expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"norm_bias_lr_scale": 0}, "norm_bias_lr_scale=0 must be positive"),
        ({"test_time_translate": -1}, "test_time_translate=-1 must be >= 0"),
    ],
)
def test_bad_airbench_options_are_refused(kwargs, message):
    with pytest.raises(InvalidArgument, match=message):
        classifier(**kwargs)
