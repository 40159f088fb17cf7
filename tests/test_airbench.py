"""airbench's tricks (Jordan 2024), each one option: the network's switches (patch whitening,
BatchNorm without scale, dirac init, residual), the whitening set from real training images
before a fit and kept on resume, lookahead against a hand computation and across a resume,
and one run with every trick on that learns."""

from __future__ import annotations

import json
from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from resnet_lightning.callbacks.lookahead import Lookahead
from resnet_lightning.callbacks.whitening import WhiteningInit
from resnet_lightning.data import ImageFolderDataModule
from resnet_lightning.errors import InvalidArgument
from resnet_lightning.models import create_model
from resnet_lightning.models.airbench import WHITENING_EPS, PatchWhitening
from resnet_lightning.training.module import ImageClassifier
from tests.cli_harness import TINY, bare_trainer, make_datamodule, run_main, without_callbacks


def airbench_classifier(name: str = "airbench94") -> ImageClassifier:
    return ImageClassifier(create_model(name), partial(torch.optim.SGD, lr=0.01, momentum=0.9))


# The network


def second_moment(patches: torch.Tensor) -> torch.Tensor:
    """E[x x^T] over the rows of `patches`, in float64."""
    patches = patches.double()
    return patches.T @ patches / len(patches)


def test_whitening_filters_whiten_the_patches_of_real_images(data_root, cifar_archive):
    images = make_datamodule(data_root, cifar_archive).train_images(1000)
    assert images.shape == (1000, 3, 32, 32)
    net = create_model("airbench94")
    net.init_whitening(images)
    layer = net.whiten
    assert isinstance(layer, PatchWhitening) and layer.weight.shape == (24, 3, 2, 2)
    assert not layer.weight.requires_grad and layer.bias.requires_grad
    # The 2x2x3 patches, flattened as the filters are, and their eigen decomposition.
    patches = F.unfold(images, 2).transpose(1, 2).reshape(-1, 12)
    eigenvalues = torch.linalg.eigvalsh(second_moment(patches)).flip(0)
    with torch.no_grad():
        out = layer(images)
    assert out.shape == (1000, 24, 31, 31)
    whitened = out[:, :12].permute(0, 2, 3, 1).reshape(-1, 12)
    torch.testing.assert_close(out[:, 12:], -out[:, :12], rtol=1e-5, atol=1e-5)  # negatives
    # Uncorrelated, each of variance eigenvalue / (eigenvalue + eps): 1 for the strong
    # directions; eps keeps the weakest (JPEG's lost fine detail) from being blown up.
    expected = torch.diag(eigenvalues / (eigenvalues + WHITENING_EPS))
    torch.testing.assert_close(second_moment(whitened), expected, atol=2e-4, rtol=0)
    assert (expected.diagonal()[:6] > 0.99).all()


def test_the_switches_of_the_network():
    paper, plain = create_model("airbench94"), create_model("airbench94", whiten=False)
    for bn in (m for m in paper.modules() if isinstance(m, nn.BatchNorm2d)):
        assert not bn.weight.requires_grad and bool((bn.weight == 1).all())
        assert bn.bias.requires_grad and (bn.momentum, bn.eps) == (0.4, 1e-12)
    assert isinstance(plain.whiten, nn.Conv2d) and not isinstance(plain.whiten, PatchWhitening)
    assert plain.whiten.weight.requires_grad
    # Dirac init: the first in_channels filters of every 3x3 conv pass their channel on.
    conv = paper.layer2.conv1  # 64 -> 256
    identity = torch.zeros(64, 64, 3, 3)
    identity[range(64), range(64), 1, 1] = 1
    assert torch.equal(conv.weight[:64].detach(), identity) and conv.weight[64:].abs().sum() > 0
    random = create_model("airbench94", dirac_init=False).layer2.conv1.weight[:64].detach()
    assert not torch.equal(random, identity)
    # The logits are the head's output / 9.
    assert paper.logit_scale == pytest.approx(1 / 9)


def test_residual_blocks_add_the_second_convs_input():
    torch.manual_seed(0)
    residual = create_model("airbench94_res").eval()
    plain = create_model("airbench94").eval()
    plain.load_state_dict(residual.state_dict())  # the same parameters
    block, plain_block = residual.layer2, plain.layer2
    x = torch.randn(2, 64, 15, 15)
    with torch.no_grad():
        middle = block.act(block.bn1(block.pool(block.conv1(x))))
        torch.testing.assert_close(block(x), middle + plain_block(x))
        assert residual(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_bad_network_values_are_refused():
    with pytest.raises(ValueError, match=r"widths=\[64, 256\] must be three"):
        create_model("airbench94", widths=[64, 256])
    with pytest.raises(ValueError, match="bn_momentum=1.5 must be in"):
        create_model("airbench94", bn_momentum=1.5)
    with pytest.raises(ValueError, match="airbench has only the cifar stem"):
        create_model("airbench94", stem="imagenet")


# The whitening set before a fit


def test_whitening_init_before_a_fit_and_not_over_a_resumed_checkpoint(
    data_root, cifar_archive, tmp_path
):
    dm = make_datamodule(data_root, cifar_archive, batch_size=8)
    module = airbench_classifier()
    trainer = bare_trainer(max_steps=1, limit_val_batches=0, callbacks=[WhiteningInit(images=500)])
    trainer.fit(module, datamodule=dm)
    expected = create_model("airbench94")
    expected.init_whitening(dm.train_images(500))
    whitening = module.net.whiten.weight.detach()
    torch.testing.assert_close(whitening, expected.whiten.weight.detach())  # and not trained
    path = tmp_path / "one_step.ckpt"
    trainer.save_checkpoint(path)

    # A resumed run whose callback would set other filters (from 100 images) keeps the
    # checkpoint's: the callback runs before the checkpoint is restored.
    resumed = airbench_classifier()
    trainer = bare_trainer(max_steps=2, limit_val_batches=0, callbacks=[WhiteningInit(images=100)])
    trainer.fit(resumed, datamodule=dm, ckpt_path=path)
    assert trainer.global_step == 2
    assert torch.equal(resumed.net.whiten.weight.detach(), whitening)


def test_whitening_init_leaves_other_networks_alone(data_root, cifar_archive):
    dm = make_datamodule(data_root, cifar_archive, batch_size=8)
    torch.manual_seed(0)
    module = ImageClassifier(create_model("resnet20"), partial(torch.optim.SGD, lr=0.0))
    before = [p.detach().clone() for p in module.net.parameters()]
    trainer = bare_trainer(max_steps=1, limit_val_batches=0, callbacks=[WhiteningInit()])
    trainer.fit(module, datamodule=dm)
    assert all(torch.equal(a, b) for a, b in zip(before, module.net.parameters(), strict=True))
    with pytest.raises(InvalidArgument, match="images=0 must be positive"):
        WhiteningInit(images=0)


def test_image_folders_hand_over_their_training_images(photos, tmp_path):
    dm = ImageFolderDataModule(
        root=str(tmp_path), path=str(photos), image_size=32, resize_size=32, num_workers=0
    )
    dm.setup()
    images = dm.train_images(10)
    assert images.shape == (10, 3, 32, 32) and images.dtype == torch.float32
    first, _ = dm.samples["train"][0]
    expected = dm.transform(train=False)(Image.open(first).convert("RGB"))
    torch.testing.assert_close(images[0], expected)


# Lookahead


def tiny_classifier() -> ImageClassifier:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))
    sgd = partial(torch.optim.SGD, lr=0.5, momentum=0.9)
    return ImageClassifier(net, sgd)


def tiny_batches(batches: int) -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(4 * batches, 3, 4, 4, generator=generator)
    labels = torch.randint(0, 10, (4 * batches,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=4)


def test_lookahead_pulls_the_weights_as_computed_by_hand():
    steps, every, decay, power = 12, 5, 0.8, 2.0
    module = tiny_classifier()
    net = module.net
    by_hand = [p.detach().clone().requires_grad_() for p in net.parameters()]
    lookahead = Lookahead(every_n_steps=every, decay=decay, power=power)
    bare_trainer(max_epochs=1, callbacks=[lookahead]).fit(module, tiny_batches(steps))

    optimizer = torch.optim.SGD(by_hand, lr=0.5, momentum=0.9)
    weight, bias = by_hand
    ema = [p.detach().clone() for p in by_hand]
    for step, (x, y) in enumerate(tiny_batches(steps), start=1):
        loss = F.cross_entropy(x.flatten(1) @ weight.T + bias, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            if step % every == 0:  # steps 5 and 10, at positions 5/12 and 10/12
                d = decay * (step / steps) ** power
                for average, p in zip(ema, by_hand, strict=True):
                    average.mul_(d).add_(p, alpha=1 - d)
                    p.copy_(average)
    with torch.no_grad():  # training ends on the average: steps 11 and 12 are dropped
        for average, p in zip(ema, by_hand, strict=True):
            p.copy_(average)
    for trained, expected in zip(net.parameters(), by_hand, strict=True):
        torch.testing.assert_close(trained.detach(), expected.detach())


class StopAfterEpochs(L.Callback):
    """Saves a checkpoint at the end of epoch `epochs` and stops: an interrupted run."""

    def __init__(self, epochs: int, path) -> None:
        self.epochs, self.path = epochs, path

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 == self.epochs:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


def test_lookahead_state_round_trips_and_a_resumed_run_ends_as_an_uninterrupted_one(tmp_path):
    def trainer(*callbacks) -> L.Trainer:
        return bare_trainer(max_epochs=4, callbacks=[Lookahead(), *callbacks])  # 3 steps/epoch

    straight = tiny_classifier()
    trainer().fit(straight, tiny_batches(3))

    path = tmp_path / "epoch2.ckpt"
    interrupted = tiny_classifier()
    trainer(StopAfterEpochs(2, path)).fit(interrupted, tiny_batches(3))
    saved = torch.load(path, weights_only=True)["callbacks"]["Lookahead"]
    # The average was pulled at step 5 and the weights trained on for a step since.
    assert set(saved) == {"ema"} and set(saved["ema"]) == {"net.1.weight", "net.1.bias"}
    copy = Lookahead()
    copy.load_state_dict(saved)
    assert all(torch.equal(copy.state_dict()["ema"][k], v) for k, v in saved["ema"].items())

    resumed = tiny_classifier()
    trainer().fit(resumed, tiny_batches(3), ckpt_path=path)
    for a, b in zip(resumed.parameters(), straight.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_steps": 0}, "every_n_steps=0 must be >= 1"),
        ({"decay": 1.5}, "decay=1.5 must be in"),
        ({"power": -1}, "power=-1 must be >= 0"),
    ],
)
def test_bad_lookahead_values_are_refused(kwargs, message):
    with pytest.raises(InvalidArgument, match=message):
        Lookahead(**kwargs)


# Every trick in one run


@pytest.mark.slow  # make test-all: a real network on 2 x 16 batches of real images
def test_airbench_res_with_every_trick_learns(tmp_path, data_overrides, capfd, monkeypatch):
    run_dir = tmp_path / "run"
    tiny = [o for o in TINY if not o.startswith(("trainer.limit", "data.batch_size"))]
    args = [
        *tiny,
        *without_callbacks("whitening", "lookahead"),
        *data_overrides,
        "model=airbench94_res",
        "callbacks=lookahead",
        "data.pipeline=tensor",
        "data.val_size=0",
        "data.batch_size=128",
        "data.padding=2",
        "data.pad_mode=reflect",
        "data.flip=alternating",
        "module.norm_bias_lr_scale=64",
        "module.label_smoothing=0.2",
        "module.test_time_flip=true",
        "module.test_time_translate=1",
        "module.lr_reference_batch=1024",
        # airbench's: lr and decay per step for a mean loss at batch 1024, momentum 0.85
        "optimizer.lr=1.5",
        "optimizer.momentum=0.85",
        "optimizer.nesterov=true",
        "optimizer.weight_decay=1.3e-3",
        "scheduler=onecycle",
        "scheduler.pct_start=0.23",
        "scheduler.anneal_strategy=linear",
        "+scheduler.div_factor=5",
        "+scheduler.final_div_factor=3",
        "+scheduler.cycle_momentum=false",
        "trainer.limit_train_batches=16",
        "trainer.limit_val_batches=0",
        "trainer.limit_test_batches=2",
        f"hydra.run.dir={run_dir}",
    ]
    code, stderr = run_main(args, capfd, monkeypatch)
    assert code == 0, stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 32 and metrics["params"] == 1_972_792
    assert metrics["test/acc"] > 0.3, metrics  # chance: 0.1
