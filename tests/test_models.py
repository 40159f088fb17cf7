"""The model zoo: parameter counts, torchvision compatibility, variants' behaviour, loading."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision
from hydra.utils import instantiate
from torch import nn

from resnet_lightning.models import create_model, get_classifier, get_model_info, list_models
from resnet_lightning.models.complexity import count_macs, count_parameters
from resnet_lightning.models.resnet import ResidualBlock, ZeroPadShortcut
from tests.cli_harness import CONFIG_DIR, compose_config

# (name, num_classes) -> parameters, from the papers, torchvision and timm.
PARAMETER_COUNTS = {
    ("resnet18", 1000): 11_689_512,
    ("resnet34", 1000): 21_797_672,
    ("resnet50", 1000): 25_557_032,
    ("resnet101", 1000): 44_549_160,
    ("resnet152", 1000): 60_192_808,
    ("resnext50_32x4d", 1000): 25_028_904,
    ("resnext101_32x8d", 1000): 88_791_336,
    ("wide_resnet50_2", 1000): 68_883_240,
    ("wide_resnet101_2", 1000): 126_886_696,
    ("resnet50d", 1000): 25_576_264,
    ("resnet20", 10): 269_722,
    ("resnet32", 10): 464_154,
    ("resnet44", 10): 658_586,
    ("resnet56", 10): 853_018,
    ("resnet110", 10): 1_727_962,
    ("resnet1202", 10): 19_421_274,
    ("preact_resnet164", 10): 1_703_258,
    ("resnext29_8x64d", 10): 34_426_698,
    ("resnext29_16x64d", 10): 68_155_210,
    ("wrn28_10", 10): 36_479_194,
    ("densenet_bc100", 10): 769_162,
    ("airbench93", 10): 569_656,
    ("airbench93_res", 10): 569_656,
    ("airbench94", 10): 1_972_792,
    ("airbench94_res", 10): 1_972_792,
}

# Too slow for a real forward and backward on 2 CPU cores (> 2 GMACs per 32 px image, or
# a thousand layers); they run on the meta device, which checks every shape.
META_ONLY = {
    "resnet101",
    "resnet152",
    "preact_resnet101",
    "preact_resnet152",
    "resnext101_32x8d",
    "wide_resnet50_2",
    "wide_resnet101_2",
    "resnet1202",
    "preact_resnet1001",
    "wrn",
    "wrn28_10",
    "resnext29_8x64d",
    "resnext29_16x64d",
}

TORCHVISION_TWINS = ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2"]


@pytest.mark.parametrize(("name", "num_classes"), list(PARAMETER_COUNTS))
def test_parameter_counts(name, num_classes):
    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes)
    assert count_parameters(model) == PARAMETER_COUNTS[name, num_classes]


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_at_32px(name):
    """As the CIFAR configs build them: CIFAR stem, 10 classes, batch of 2 at 32 px."""
    if name in META_ONLY:
        with torch.device("meta"):
            logits = create_model(name, stem="cifar")(torch.empty(2, 3, 32, 32))
        assert logits.shape == (2, 10)
        return
    torch.manual_seed(0)
    model = create_model(name, stem="cifar")
    logits = model(torch.randn(2, 3, 32, 32))
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 10)
    logits.logsumexp(1).sum().backward()
    # Frozen parameters (airbench's whitening filters and BN scales) take no gradient.
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, f"parameters outside the graph: {unused[:5]}"


@pytest.mark.parametrize("name", [n for n in list_models() if get_model_info(n).input_size == 224])
def test_imagenet_models_at_224px_with_default_stem(name):
    info = get_model_info(name)
    with torch.device("meta"):
        model = create_model(name, num_classes=7)
        logits = model(torch.empty(1, 3, info.input_size, info.input_size))
    assert logits.shape == (1, 7)
    assert info.reference and info.family
    assert any(isinstance(m, nn.Linear) for m in get_classifier(model).modules())


@pytest.mark.parametrize("name", TORCHVISION_TWINS)
def test_torchvision_state_dict_loads_strictly_with_equal_outputs(name):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)()
    x = torch.randn(2, 3, 32, 32)
    reference.train()(x)  # move BN running statistics away from their 0/1 start
    with torch.device("meta"):  # skip an initialisation the load overwrites
        ours = create_model(name, num_classes=1000)
    ours.load_state_dict(reference.state_dict(), strict=True, assign=True)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), reference.eval()(x))


def test_resnet_v1_puts_the_stride_on_the_first_1x1_conv():
    with torch.device("meta"):
        v1, v15 = create_model("resnet50_v1"), create_model("resnet50")
    assert v1.layer2[0].conv1.stride == (2, 2) and v1.layer2[0].conv2.stride == (1, 1)
    assert v15.layer2[0].conv1.stride == (1, 1) and v15.layer2[0].conv2.stride == (2, 2)
    # Figures quoted in the literature: 3.86 vs 4.09 GMACs at 224 px.
    assert round(count_macs(v1, 224) / 1e9, 2) == 3.86
    assert round(count_macs(v15, 224) / 1e9, 2) == 4.09


def test_resnet_d_averages_before_projecting_and_uses_the_deep_stem():
    with torch.device("meta"):
        model = create_model("resnet50d", num_classes=1000)
    assert sum(isinstance(m, nn.Conv2d) for m in model.conv1) == 3
    pool, conv, _ = model.layer2[0].downsample
    assert isinstance(pool, nn.AvgPool2d) and conv.stride == (1, 1)


@pytest.mark.parametrize(
    ("name", "width", "expected_macs"),
    [("airbench94", 256, 118_147_360), ("airbench93", 128, 54_223_904)],
)
def test_airbench_counts_from_its_layer_shapes(name, width, expected_macs):
    """airbench's parameters and MACs from its layers' shapes (Jordan 2024: whitening 2x2
    conv 3 -> 24, convs of 64/width/width channels at 31 -> 15 -> 7 -> 3 px, a width x 10
    head; airbench94's width is 256, airbench93's 128)."""
    convs = [(24, 64), (64, 64), (64, width), (width, width), (width, width), (width, width)]
    whitening = 24 * 3 * 2 * 2 + 24  # frozen filters, trainable bias
    batch_norms = 2 * sum(out for _, out in convs)  # weight (frozen at 1) and bias
    params = whitening + sum(9 * i * o for i, o in convs) + batch_norms + width * 10
    # Each block's first conv runs before its pool, the second after it.
    sides = [31, 15, 15, 7, 7, 3]
    macs = (
        31 * 31 * 24 * 12
        + sum(s * s * 9 * i * o for s, (i, o) in zip(sides, convs, strict=True))
        + width * 10
    )
    with torch.device("meta"):
        model = create_model(name)
    assert count_parameters(model) == params == PARAMETER_COUNTS[name, 10]
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen == 24 * 12 + batch_norms // 2
    assert count_macs(model, 32) == macs == expected_macs


def test_option_a_shortcut_is_parameter_free_zero_padding():
    with torch.device("meta"):
        option_a, option_b = create_model("resnet20"), create_model("resnet20", shortcut="B")
        plain = create_model("plain20")
    assert count_parameters(option_a) == count_parameters(plain) < count_parameters(option_b)
    shortcut = option_a.layer2[0].downsample
    assert isinstance(shortcut, ZeroPadShortcut)
    x = torch.randn(2, 16, 32, 32)
    out = shortcut(x)
    assert out.shape == (2, 32, 16, 16)
    torch.testing.assert_close(out[:, :16], x[:, :, ::2, ::2])
    assert not out[:, 16:].any()


def _first_identity_block(model: nn.Module) -> nn.Module:
    return next(m for m in model.modules() if isinstance(m, ResidualBlock) and m.downsample is None)


@pytest.mark.parametrize("name", ["resnet20", "resnet50", "preact_resnet18", "preact_resnet164"])
def test_zero_init_residual_makes_blocks_identities(name):
    model = create_model(name, stem="cifar", zero_init_residual=True).eval()
    block = _first_identity_block(model)
    x = torch.randn(2, block.conv1.in_channels, 8, 8).relu()  # blocks see post-ReLU input
    with torch.no_grad():
        torch.testing.assert_close(block(x), x)


def test_plain_network_has_no_shortcuts():
    plain, residual = create_model("plain20"), create_model("resnet20")
    assert all(getattr(m, "downsample", None) is None for m in plain.modules())
    assert not any(isinstance(m, ZeroPadShortcut) for m in plain.modules())
    # With the residual branch silenced, a residual block passes its input on and a plain
    # block outputs nothing: the sum with the shortcut is really gone.
    x = torch.randn(2, 16, 8, 8).relu()
    with torch.no_grad():
        for model, expected in ((residual, x), (plain, torch.zeros_like(x))):
            block = model.layer1[0].eval()
            block.zero_init_last()
            torch.testing.assert_close(block(x), expected)
    with pytest.raises(ValueError, match="plain"):
        create_model("plain20", zero_init_residual=True)


def test_wrn_depth_width_and_dropout_are_arguments():
    with torch.device("meta"):
        model = create_model("wrn", depth=16, widen_factor=4, dropout=0.3)
    assert len(model.layer1) == 2 and model.fc.in_features == 256
    assert model.layer1[0].dropout.p == 0.3
    with pytest.raises(ValueError, match=r"WRN depth must be 6n \+ 4 .*got 27"):
        create_model("wrn", depth=27)


@pytest.mark.parametrize("stem", ["cifar", "imagenet", "deep"])
def test_every_stem_on_a_cifar_net(stem):
    model = create_model("resnet20", stem=stem)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_unknown_name_lists_known_models():
    with pytest.raises(ValueError, match="unknown model 'resnet19'; known models: .*resnet18"):
        create_model("resnet19")


@pytest.mark.parametrize(
    ("name", "kwargs"), [("resnet18", {"depht": 3}), ("resnet20", {"dropout": 0.1})]
)
def test_unknown_argument_is_named(name, kwargs):
    with pytest.raises(TypeError, match=next(iter(kwargs))):
        create_model(name, **kwargs)


def test_bad_stem_is_rejected():
    with pytest.raises(ValueError, match="stem"):
        create_model("resnet18", stem="cifra")
    with pytest.raises(ValueError, match="stem"):
        create_model("vgg16", stem="deep")


def test_channels_last_and_compile_keep_state_dict_keys(monkeypatch):
    model = create_model("resnet20", channels_last=True)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    modes = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, mode=None: modes.append(mode))
    create_model("resnet20", compile=True)
    create_model("resnet20", compile="max-autotune")
    assert modes == [None, "max-autotune"]
    monkeypatch.undo()
    compiled = create_model("resnet20", compile=True)  # lazy: compiles on first forward
    assert compiled.state_dict().keys() == create_model("resnet20").state_dict().keys()


def test_models_pickle_for_ddp_spawn():
    model = create_model("resnet20")
    assert pickle.loads(pickle.dumps(model)).model_info.name == "resnet20"
    assert copy.deepcopy(model).model_info.name == "resnet20"


@pytest.fixture
def torchvision_resnet18_file(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    state_dict = torchvision.models.resnet18().state_dict()  # random init: no download
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(state_dict, path)
    return path, state_dict


def test_pretrained_file_with_frozen_backbone_trains_only_the_head(torchvision_resnet18_file):
    path, state_dict = torchvision_resnet18_file
    model = create_model("resnet18", stem="imagenet", pretrained=str(path), freeze_backbone=True)
    assert model.fc.out_features == 10
    torch.testing.assert_close(model.layer4[1].conv2.weight, state_dict["layer4.1.conv2.weight"])
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    optimizer.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed == ["fc.weight", "fc.bias"]


def test_pretrained_weights_that_do_not_fit_the_stem_fail_clearly(torchvision_resnet18_file):
    path, _ = torchvision_resnet18_file
    with pytest.raises(ValueError, match=r"conv1\.weight.*stem=imagenet"):
        create_model("resnet18", stem="cifar", pretrained=str(path))


def test_pretrained_file_without_num_batches_tracked_loads(torchvision_resnet18_file, tmp_path):
    # torchvision's older ImageNet weights predate BatchNorm's num_batches_tracked buffer.
    _, state_dict = torchvision_resnet18_file
    old = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pth")
    model = create_model("resnet18", stem="imagenet", pretrained=str(tmp_path / "old.pth"))
    loaded = model.layer1[0].bn1.running_var
    torch.testing.assert_close(loaded, state_dict["layer1.0.bn1.running_var"])


def test_torchvision_tag_reads_torch_hubs_cache(torchvision_resnet18_file, tmp_path, monkeypatch):
    path, state_dict = torchvision_resnet18_file
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    cached = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True)
    cached.write_bytes(path.read_bytes())
    model = create_model("resnet18", stem="imagenet", pretrained="IMAGENET1K_V1", num_classes=1000)
    torch.testing.assert_close(model.fc.weight, state_dict["fc.weight"])  # same head: kept


def test_offline_without_cache_gives_a_one_line_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError) as error:
        create_model("resnet50", stem="imagenet", pretrained="IMAGENET1K_V2")
    message = str(error.value)
    assert "could not download IMAGENET1K_V2 weights for resnet50" in message
    assert str(tmp_path / "checkpoints") in message and "\n" not in message


def test_unknown_tag_and_models_without_torchvision_weights():
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        create_model("resnet18", pretrained="IMAGENET1K_V9")
    with pytest.raises(ValueError, match="no weights that fit resnet20"):
        create_model("resnet20", pretrained="IMAGENET1K_V1")


def test_every_registered_model_has_a_config():
    configs = {p.stem for p in Path(CONFIG_DIR, "model").glob("*.yaml") if p.stem[0] != "_"}
    assert configs == set(list_models())


@pytest.mark.parametrize("name", list_models())
def test_config_composes_and_instantiates(name):
    cfg = compose_config([f"model={name}"])
    assert cfg.model.name == name and cfg.model.num_classes == cfg.data.num_classes
    with torch.device("meta"):
        model = instantiate(cfg.model)
    assert model.model_info.name == name
    head = [m for m in get_classifier(model).modules() if isinstance(m, nn.Linear)][-1]
    assert head.out_features == cfg.data.num_classes


def test_stable_override_names():
    overrides = [
        "model=resnet18",
        "model.stem=imagenet",
        "model.num_classes=100",
        "model.pretrained=null",
        "model.channels_last=true",
        "model.compile=false",
        "model.zero_init_residual=true",
    ]
    model = instantiate(compose_config(overrides).model)
    assert isinstance(model.maxpool, nn.MaxPool2d) and model.fc.out_features == 100
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
