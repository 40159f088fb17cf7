"""The modern regularisers on real CIFAR images: Mixup / CutMix of whole training batches,
stochastic depth, no weight decay on norms and biases, and gradient clipping."""

from __future__ import annotations

import csv
import math
import warnings
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

from resnet_lightning.data.mixing import batch_mixer
from resnet_lightning.models import create_model
from resnet_lightning.training.config import build_module, instantiate_group
from resnet_lightning.training.module import ImageClassifier
from tests.cli_harness import (
    TINY,
    bare_trainer,
    compose_config,
    make_datamodule,
    run_main,
    without_callbacks,
)

NUM_CLASSES = 10


def first_train_batch(dm) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = next(iter(dm.train_dataloader()))
    return images, labels


def classifier(**kwargs) -> ImageClassifier:
    sgd = partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4)
    return ImageClassifier(create_model("resnet20"), sgd, **kwargs)


def check_soft_targets(labels: torch.Tensor, targets: torch.Tensor) -> float:
    """Each row lam on its own label and 1 - lam on its neighbour's (the batch rolled by
    one), one lam for the batch; returns lam."""
    assert targets.shape == (len(labels), NUM_CLASSES) and targets.dtype == torch.float32
    assert (targets >= 0).all()
    torch.testing.assert_close(targets.sum(1), torch.ones(len(labels)))
    neighbour = labels.roll(1)
    differ = labels != neighbour
    assert differ.any()
    lam = targets[differ, labels[differ]]
    torch.testing.assert_close(lam, lam[:1].expand_as(lam))  # one lam for the batch
    lam = float(lam[0])
    own, other = F.one_hot(labels, NUM_CLASSES), F.one_hot(neighbour, NUM_CLASSES)
    torch.testing.assert_close(targets, lam * own + (1 - lam) * other)
    return lam


def test_mixup_blends_each_image_with_its_neighbour(data_root, cifar_archive):
    dm = make_datamodule(data_root, cifar_archive, batch_size=32, mixup_alpha=0.4)
    images, labels = first_train_batch(dm)
    torch.manual_seed(0)
    mixed, targets = dm.mixer(images, labels)
    lam = check_soft_targets(labels, targets)
    assert 0 < lam < 1
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.roll(1, 0))


@pytest.mark.parametrize(
    "mixing",
    [{"cutmix_alpha": 1.0}, {"cutmix_alpha": 1.0, "mixup_alpha": 0.2, "mix_switch_prob": 1.0}],
)
def test_cutmix_pastes_a_box_and_weighs_it_by_its_area(mixing, data_root, cifar_archive):
    # No crops: their zero padding would make the two images agree in places.
    dm = make_datamodule(data_root, cifar_archive, batch_size=32, augment=False, **mixing)
    images, labels = first_train_batch(dm)
    torch.manual_seed(0)
    mixed, targets = dm.mixer(images, labels)
    lam = check_soft_targets(labels, targets)
    changed = (mixed != images).any(1).any(0)  # (H, W): pixels pasted in any image
    rows, cols = changed.any(1).nonzero(), changed.any(0).nonzero()
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    box = torch.zeros(32, 32, dtype=torch.bool)
    box[top:bottom, left:right] = True
    assert 0 < box.sum() < 32 * 32
    assert torch.equal(mixed[..., box], images.roll(1, 0)[..., box])
    assert torch.equal(mixed[..., ~box], images[..., ~box])
    assert lam == pytest.approx(1 - float(box.sum()) / (32 * 32), abs=1e-6)


def test_integer_alphas_mix():
    """`data.cutmix_alpha=1` on the command line is an int, which torch's Beta refuses."""
    images, labels = torch.rand(4, 3, 32, 32), torch.arange(4)
    for alphas in ({"mixup_alpha": 1}, {"cutmix_alpha": 1}):
        _, targets = batch_mixer(NUM_CLASSES, **alphas)(images, labels)
        assert targets.shape == (4, NUM_CLASSES)


def test_mix_prob_zero_leaves_the_batch_untouched(data_root, cifar_archive):
    dm = make_datamodule(
        data_root, cifar_archive, batch_size=32, mixup_alpha=1.0, cutmix_alpha=1.0, mix_prob=0
    )
    images, labels = first_train_batch(dm)
    out_images, out_labels = dm.mixer(images, labels)
    assert torch.equal(out_images, images) and torch.equal(out_labels, labels)


def test_only_training_batches_are_mixed(data_root, cifar_archive):
    """A real fit: the batches the module trains on carry soft targets, the validation
    batches are those of the validation loader."""

    class Batches(L.Callback):
        def __init__(self):
            self.train, self.val = [], []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.train.append(batch)

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, *args):
            self.val.append(batch)

    dm = make_datamodule(data_root, cifar_archive, batch_size=8, mixup_alpha=0.2, cutmix_alpha=1.0)
    seen = Batches()
    # The sanity check and the validation after the step, both of the first batch.
    trainer = bare_trainer(max_steps=1, limit_val_batches=1, val_check_interval=1, callbacks=[seen])
    trainer.fit(classifier(), datamodule=dm)
    assert len(seen.train) == 1 and len(seen.val) == 2
    for _, targets in seen.train:
        assert targets.shape == (8, NUM_CLASSES)
        torch.testing.assert_close(targets.sum(1), torch.ones(8))
    val_images, val_labels = next(iter(dm.val_dataloader()))
    for images, labels in seen.val:
        assert labels.dtype == torch.int64 and labels.ndim == 1
        assert torch.equal(images, val_images) and torch.equal(labels, val_labels)


def test_mixing_draws_depend_on_the_batch_not_on_the_global_generator(
    data_root, cifar_archive, monkeypatch
):
    """Each batch's mixing (which mixer, lam, the box) is drawn from (seed, epoch, batch,
    rank): the same whatever else used torch's generator before, as after a resume that
    restored or reseeded it differently (a DDP rank's mid-epoch resume)."""

    class MixedTargets(L.Callback):
        def __init__(self):
            self.targets = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.targets.append(batch[1])

    monkeypatch.setenv("PL_GLOBAL_SEED", "7")  # the run's seed, as seed_everything sets it
    runs = []
    for global_seed in (0, 1):
        dm = make_datamodule(
            data_root, cifar_archive, batch_size=8, mixup_alpha=0.4, cutmix_alpha=1.0
        )
        seen = MixedTargets()
        torch.manual_seed(global_seed)
        trainer = bare_trainer(max_steps=3, limit_val_batches=0, callbacks=[seen])
        trainer.fit(classifier(), datamodule=dm)
        runs.append(torch.stack(seen.targets))
    assert torch.equal(runs[0], runs[1])
    assert runs[0].shape == (3, 8, NUM_CLASSES)  # soft targets: the batches were mixed


def test_label_smoothing_of_mixed_targets_is_timms():
    """CrossEntropyLoss smooths probability targets as timm's mixup_target mixes smoothed
    one-hot labels: lam * smooth(a) + (1 - lam) * smooth(b)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, NUM_CLASSES, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (8,), generator=generator)
    lam, smoothing = 0.7, 0.1
    own, other = F.one_hot(labels, NUM_CLASSES), F.one_hot(labels.roll(1), NUM_CLASSES)
    off = smoothing / NUM_CLASSES
    on = 1 - smoothing + off
    timm_target = lam * (own * on + (1 - own) * off) + (1 - lam) * (other * on + (1 - other) * off)
    expected = -(timm_target * logits.log_softmax(1)).sum(1).mean()
    mixed = lam * own.float() + (1 - lam) * other.float()
    loss = nn.CrossEntropyLoss(label_smoothing=smoothing)(logits, mixed)
    torch.testing.assert_close(loss, expected)


def test_label_smoothing_changes_the_loss_by_its_formula(data_root, cifar_archive):
    """The loss the module trains on, for smoothing e: (1 - e) x cross-entropy + e x the mean
    over the classes of -log p; the config's default e is 0."""
    dm = make_datamodule(data_root, cifar_archive, batch_size=16, augment=False)
    images, labels = first_train_batch(dm)
    overrides = ["model=resnet20", "scheduler=none"]
    for e, smoothing in (
        (0.0, []),
        (0.1, ["module.label_smoothing=0.1"]),
        (0.3, ["module.label_smoothing=0.3"]),
    ):
        cfg = compose_config([*overrides, *smoothing])
        torch.manual_seed(0)
        module = build_module(cfg, instantiate_group(cfg, "model")).eval()  # the same logits twice
        with torch.no_grad():
            module.net.fc.weight *= 10  # confident logits, far from uniform: smoothing shows
            with warnings.catch_warnings():  # self.log without a Trainer: a warning, no log
                warnings.simplefilter("ignore")
                loss = module.training_step((images, labels), 0)
            log_p = module(images).log_softmax(1)
        cross_entropy = -log_p.gather(1, labels[:, None]).mean()
        uniform = -log_p.mean(1).mean()
        assert abs(uniform - cross_entropy) > 1  # the test can tell the two terms apart
        torch.testing.assert_close(loss, (1 - e) * cross_entropy + e * uniform)


def read_metrics_csv(run_dir: Path) -> list[dict[str, str]]:
    (path,) = run_dir.glob("**/metrics.csv")
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("pipeline", ["torchvision", "tensor"])
def test_run_with_every_modern_switch_trains_and_logs_finite_metrics(
    pipeline, tmp_path, data_overrides, capfd, monkeypatch
):
    run_dir = tmp_path / "run"
    args = [
        *TINY,
        *without_callbacks(),
        *data_overrides,
        "model=resnet20",
        "logger=csv",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "data.batch_size=8",
        f"data.pipeline={pipeline}",
        "data.mixup_alpha=0.2",
        "data.cutmix_alpha=1.0",
        # The other modern switches in the same run: they compose.
        "data.policy=trivialaugment",
        "data.random_erasing=0.25",
        "model.drop_path=0.1",
        "module.no_decay_bn_bias=true",
        "module.label_smoothing=0.1",
        "trainer.gradient_clip_val=1.0",
        f"hydra.run.dir={run_dir}",
    ]
    code, stderr = run_main(args, capfd, monkeypatch)
    assert code == 0, stderr
    rows = read_metrics_csv(run_dir)
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    accuracies = [float(r["train/acc"]) for r in rows if r.get("train/acc")]
    assert len(losses) == 2 and accuracies
    assert all(math.isfinite(v) for v in losses + accuracies)


# Stochastic depth


def block_drop_probabilities(net: nn.Module) -> list[float]:
    blocks = [b for name in net.stage_names for b in getattr(net, name)]
    return [0.0 if b.drop_path is None else b.drop_path.p for b in blocks]


@pytest.mark.parametrize(("name", "blocks"), [("resnet20", 9), ("preact_resnet110", 54)])
def test_drop_probability_rises_linearly_to_the_last_block(name, blocks):
    net = create_model(name, drop_path=0.2)
    expected = torch.linspace(0, 0.2, blocks).tolist()
    assert block_drop_probabilities(net) == pytest.approx(expected)


def test_drop_path_zero_builds_no_stochastic_depth():
    net = create_model("resnet20")
    assert not any(isinstance(m, StochasticDepth) for m in net.modules())
    assert block_drop_probabilities(net) == [0.0] * 9


def test_drop_path_is_off_in_eval_and_random_in_training(data_root, cifar_archive):
    images, _ = first_train_batch(make_datamodule(data_root, cifar_archive, batch_size=8))
    torch.manual_seed(0)
    dropping = instantiate_group(compose_config(["model=resnet20", "model.drop_path=0.5"]), "model")
    plain = instantiate_group(compose_config(["model=resnet20"]), "model")
    plain.load_state_dict(dropping.state_dict())  # stochastic depth adds no keys
    dropping.eval()
    plain.eval()
    with torch.no_grad():
        first, second, reference = dropping(images), dropping(images), plain(images)
        dropping.train()  # BatchNorm on the batch's statistics: the same in both passes
        train_first, train_second = dropping(images), dropping(images)
    assert first.shape == (8, NUM_CLASSES)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, reference)
    assert not torch.allclose(train_first, train_second)


def test_training_drops_whole_rows_of_the_residual_branch(data_root, cifar_archive):
    images, _ = first_train_batch(make_datamodule(data_root, cifar_archive, batch_size=32))
    net = create_model("resnet20", drop_path=0.8).train()
    last = net.layer3[-1].drop_path
    assert last.p == pytest.approx(0.8)
    seen = {}
    last.register_forward_hook(lambda module, inputs, output: seen.update(x=inputs[0], y=output))
    torch.manual_seed(0)
    with torch.no_grad():
        net(images)
    branch, out = seen["x"], seen["y"]
    dropped = (out == 0).flatten(1).all(1)
    assert 0 < dropped.sum() < len(images)  # some rows, not all
    assert (branch[dropped] != 0).any()  # they were not zero before
    torch.testing.assert_close(out[~dropped], branch[~dropped] / (1 - 0.8))


def test_models_without_residual_branches_refuse_drop_path():
    with pytest.raises(ValueError, match="plain network has none"):
        create_model("plain20", drop_path=0.1)
    with pytest.raises(TypeError, match="resnet9.*drop_path"):
        create_model("resnet9", drop_path=0.1)


# Weight decay off norms and biases


def named_groups(module: ImageClassifier) -> list[tuple[set[str], float, float]]:
    """(parameter names, lr, weight decay) of each optimizer group."""
    names = {id(p): n for n, p in module.net.named_parameters()}
    optimizer = module.configure_optimizers()
    return [
        ({names[id(p)] for p in g["params"]}, g["lr"], g["weight_decay"])
        for g in optimizer.param_groups
    ]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("no_decay", [False, True])  # False: the config's default
def test_a_step_without_gradient_decays_all_but_norms_and_biases(optimizer, no_decay):
    """With zero gradients a step is the weight decay alone: every decayed parameter shrinks
    by lr x weight_decay (SGD's coupled decay on its first step, AdamW's decoupled one alike),
    and with module.no_decay_bn_bias the norm layers' parameters and the biases (here: the
    one-dimensional parameters) stay as they were."""
    overrides = [f"optimizer={optimizer}", "model=resnet20", "scheduler=none"]
    cfg = compose_config([*overrides, f"module.no_decay_bn_bias={no_decay}"])
    module = build_module(cfg, instantiate_group(cfg, "model"))
    step = module.configure_optimizers()
    before = {name: p.detach().clone() for name, p in module.net.named_parameters()}
    for p in module.net.parameters():
        p.grad = torch.zeros_like(p)
    step.step()
    shrink = 1 - cfg.optimizer.lr * cfg.optimizer.weight_decay
    spared = {name for name, p in module.net.named_parameters() if p.ndim == 1}
    assert "fc.bias" in spared and "layer3.2.bn2.weight" in spared
    for name, p in module.net.named_parameters():
        if no_decay and name in spared:
            assert torch.equal(p, before[name]), name
        else:  # rtol well under the decay's 1e-5 (SGD) or 5e-5 (AdamW) a step
            torch.testing.assert_close(p.detach(), before[name] * shrink, rtol=1e-6, atol=0)


def test_no_decay_with_a_scaled_backbone_learning_rate():
    module = classifier(no_decay_bn_bias=True, backbone_lr_scale=0.1)
    groups = named_groups(module)
    assert [(names, wd) for names, _, wd in groups[:2]] == [
        ({"fc.weight"}, 5e-4),
        ({"fc.bias"}, 0.0),
    ]
    (backbone, lr, wd), (backbone_spared, lr_spared, wd_spared) = groups[2:]
    assert all("bn" not in n and n.endswith("weight") for n in backbone)
    assert backbone_spared and all("bn" in n for n in backbone_spared)
    assert lr == pytest.approx(0.01) and lr_spared == pytest.approx(0.01)
    assert (wd, wd_spared) == (5e-4, 0.0)
    assert len(backbone | backbone_spared) + 2 == len(list(module.net.parameters()))


# Gradient clipping


class GradientNorms(L.Callback):
    """The total L2 norm and largest entry of the gradients each optimizer step used:
    Lightning clips after on_before_optimizer_step, and the gradients stay as clipped until
    the next batch zeroes them, so they are read at the batch's end."""

    def __init__(self):
        self.norms, self.largest = [], []

    def on_train_batch_end(self, trainer, pl_module, *args):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        self.largest.append(max(float(g.abs().max()) for g in grads))


def clipped_run(data_root, cifar_archive, tmp_path, *clipping: str) -> GradientNorms:
    """One step with the Trainer of the real config and `clipping`'s overrides."""
    dm = make_datamodule(data_root, cifar_archive, batch_size=8)
    record = GradientNorms()
    cfg = compose_config(
        [
            "trainer=cpu",
            "trainer.precision=32-true",
            "trainer.max_steps=1",
            "trainer.limit_val_batches=0",
            "trainer.num_sanity_val_steps=0",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
            f"paths.output_dir={tmp_path}",
            *clipping,
        ]
    )
    trainer = instantiate_group(
        cfg, "trainer", callbacks=[record], logger=False, enable_checkpointing=False
    )
    torch.manual_seed(0)
    trainer.fit(classifier(), datamodule=dm)
    return record


def test_gradient_clipping_clips(data_root, cifar_archive, tmp_path):
    free = clipped_run(data_root, cifar_archive, tmp_path)
    by_norm = clipped_run(data_root, cifar_archive, tmp_path, "trainer.gradient_clip_val=0.1")
    by_value = clipped_run(
        data_root,
        cifar_archive,
        tmp_path,
        "trainer.gradient_clip_val=0.001",
        "trainer.gradient_clip_algorithm=value",
    )
    assert min(free.norms) > 0.1 and max(free.largest) > 0.001
    assert by_norm.norms == pytest.approx([0.1], rel=1e-4)
    assert max(by_value.largest) <= 0.001 + 1e-9
