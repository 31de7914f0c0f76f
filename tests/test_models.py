"""Backbones, heads and create_backbone: shapes, parameter counts, weight loading, validation."""

from __future__ import annotations

import math
import urllib.error

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from openworld.models import ClassifierNet, CosineClassifier, LinearClassifier, create_backbone
from openworld.models import backbones as bb
from openworld.registry import BACKBONES, RegistryError


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build(name: str, input_size: tuple[int, ...], **kwargs) -> nn.Module:
    in_channels = input_size[0] if len(input_size) == 3 else 1
    return create_backbone(name, in_channels=in_channels, input_size=input_size, **kwargs)


def torchvision_resnet18_state(seed: int = 123) -> dict[str, torch.Tensor]:
    """A full torchvision ResNet-18 state dict (fc included), distinct from any default init."""
    from torchvision.models import resnet18

    torch.manual_seed(seed)
    model = resnet18(weights=None)
    with torch.no_grad():  # make BN statistics non-trivial, so loading them is actually checked
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.state_dict()


# ------------------------------------------------------------------------------------------------
# shapes and out_features
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, input_size, kwargs, d",
    [
        ("resnet20", (3, 32, 32), {}, 64),
        ("resnet18", (3, 64, 64), {}, 512),
        ("resnet18", (3, 32, 32), {"small_input": True}, 512),
        ("cnn28", (1, 28, 28), {}, 64),
        ("cnn28", (3, 32, 32), {"widths": (8, 16, 32)}, 32),
        ("cnn8", (1, 8, 8), {}, 64),
        ("cnn8", (1, 8, 8), {"width": 8}, 16),
        ("mlp", (256,), {}, 128),
        ("mlp", (1, 8, 8), {"hidden": [32, 32], "out_features": 16}, 16),
        ("timm", (3, 32, 32), {"model_name": "test_convnext"}, 64),
        ("timm/test_convnext", (3, 32, 32), {}, 64),
    ],
)
def test_backbone_output_shape_and_out_features(name, input_size, kwargs, d):
    torch.manual_seed(0)
    model = build(name, input_size, **kwargs).eval()
    assert isinstance(model.out_features, int) and model.out_features == d
    with torch.no_grad():
        z = model(torch.randn(3, *input_size))
    assert z.shape == (3, d)
    assert torch.isfinite(z).all()


def test_builtins_are_registered():
    assert {"resnet20", "resnet18", "cnn28", "cnn8", "mlp", "timm"} <= set(BACKBONES.names())
    assert BACKBONES.get("resnet20") is bb.resnet20
    assert BACKBONES.get("timm") is bb.timm_backbone


def test_resnet20_architecture_and_parameter_count():
    model = build("resnet20", (3, 32, 32))

    def conv(i, o, k):
        return i * o * k * k

    def bn(c):
        return 2 * c

    def block(i, o):  # two 3×3 conv-BN, plus a 1×1 conv-BN projection when the shape changes
        proj = conv(i, o, 1) + bn(o) if i != o else 0
        return conv(i, o, 3) + bn(o) + conv(o, o, 3) + bn(o) + proj

    expected = conv(3, 16, 3) + bn(16)
    for i, o in [(16, 16), (16, 32), (32, 64)]:
        expected += block(i, o) + 2 * block(o, o)
    assert expected == 271_824
    assert n_params(model) == expected
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].kernel_size == (3, 3) and convs[0].stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert sum(m.kernel_size == (3, 3) for m in convs) == 19  # stem + 2 × 9 blocks; projections are 1×1


def test_resnet18_parameter_counts_and_stems():
    big = build("resnet18", (3, 224, 224))
    small = build("resnet18", (3, 32, 32), small_input=True)
    assert n_params(big) == 11_689_512 - (512 * 1000 + 1000)  # torchvision resnet18 minus fc
    assert n_params(small) == n_params(big) - 64 * 3 * (7 * 7 - 3 * 3)
    assert big.conv1.kernel_size == (7, 7) and isinstance(big.maxpool, nn.MaxPool2d)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    gray = build("resnet18", (1, 64, 64))
    assert gray.conv1.in_channels == 1 and gray(torch.randn(2, 1, 64, 64)).shape == (2, 512)


def test_small_cnn_parameter_counts():
    # cnn28: conv3×3 1→16→32→64 (+BN each) = 144+32 + 4608+64 + 18432+128
    assert n_params(build("cnn28", (1, 28, 28))) == 23_408
    # cnn8: conv3×3 1→32→64→64 (+BN each) = 288+64 + 18432+128 + 36864+128
    assert n_params(build("cnn8", (1, 8, 8))) == 55_904
    # mlp 256→256→128 with BN after both layers
    assert n_params(build("mlp", (256,))) == (256 * 256 + 256 + 512) + (256 * 128 + 128 + 256)


def test_mlp_feature_mismatch_is_a_clear_error():
    model = build("mlp", (256,))
    with pytest.raises(ValueError, match="expects 256 input features"):
        model(torch.randn(4, 100))


# ------------------------------------------------------------------------------------------------
# weights
# ------------------------------------------------------------------------------------------------
def _assert_loaded(model: nn.Module, state: dict[str, torch.Tensor], skip: tuple[str, ...] = ()):
    own = model.state_dict()
    for key, value in state.items():
        if key.startswith("fc.") or key in skip:
            continue
        assert torch.equal(own[key], value), key


def test_resnet18_loads_local_torchvision_state_dict(tmp_path):
    from torchvision.models import resnet18

    state = torchvision_resnet18_state()
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)

    torch.manual_seed(0)
    model = build("resnet18", (3, 64, 64), weights_path=str(path)).eval()
    _assert_loaded(model, state)
    assert not any(k.startswith("fc.") for k in model.state_dict())

    reference = resnet18(weights=None)
    reference.load_state_dict(state)
    reference.fc = nn.Identity()
    reference.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)

    # a wrapped checkpoint ({"state_dict": ...}, DataParallel prefix) loads the same weights
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    _assert_loaded(build("resnet18", (3, 64, 64), weights_path=str(wrapped)), state)


def test_resnet18_weights_errors_and_small_input_stem(tmp_path):
    state = torchvision_resnet18_state()
    broken = {k: v for k, v in state.items() if not k.startswith("layer4.1.")}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="missing keys: layer4.1"):
        build("resnet18", (3, 64, 64), weights_path=str(tmp_path / "broken.pth"))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build("resnet18", (3, 64, 64), weights_path=str(tmp_path / "nope.pth"))

    torch.save(state, tmp_path / "ok.pth")
    with pytest.warns(UserWarning, match="conv1.weight not loaded"):
        small = build("resnet18", (3, 32, 32), small_input=True, weights_path=str(tmp_path / "ok.pth"))
    _assert_loaded(small, state, skip=("conv1.weight",))
    assert small.conv1.weight.shape == (64, 3, 3, 3)


def test_resnet18_pretrained_goes_through_torchvision_weights_api(monkeypatch):
    from torchvision.models import ResNet18_Weights

    state = torchvision_resnet18_state(seed=7)
    calls = []

    def fake_get_state_dict(self, *args, **kwargs):
        calls.append(self)
        return state

    monkeypatch.setattr(ResNet18_Weights, "get_state_dict", fake_get_state_dict)
    model = build("resnet18", (3, 224, 224), pretrained=True)
    assert calls == [ResNet18_Weights.IMAGENET1K_V1]
    _assert_loaded(model, state)


@pytest.mark.parametrize("error", [urllib.error.URLError("no route to host"), OSError("network is unreachable")])
def test_resnet18_pretrained_offline_gives_a_clear_error(monkeypatch, error):
    from torchvision.models import ResNet18_Weights

    def offline(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(ResNet18_Weights, "get_state_dict", offline)
    with pytest.raises(RuntimeError) as info:
        build("resnet18", (3, 224, 224), pretrained=True)
    message = str(info.value)
    assert "IMAGENET1K_V1" in message and "resnet18-" in message and "weights_path" in message
    assert isinstance(info.value.__cause__, type(error))


def test_timm_source_loads_local_weights_and_reports_offline(tmp_path, monkeypatch):
    import timm
    import timm.models._builder as timm_builder

    torch.manual_seed(5)
    state = timm.create_model("resnet18").state_dict()  # with its 1000-way fc
    torch.save(state, tmp_path / "timm_r18.pth")
    model = build("resnet18", (3, 64, 64), source="timm", weights_path=str(tmp_path / "timm_r18.pth"))
    assert model.out_features == 512
    _assert_loaded(model.model, state)

    def offline(*args, **kwargs):
        raise OSError("cannot reach the hub")

    monkeypatch.setattr(timm_builder, "load_pretrained", offline)
    with pytest.raises(RuntimeError, match="weights_path"):
        build("timm", (3, 32, 32), model_name="resnet18", pretrained=True)


# ------------------------------------------------------------------------------------------------
# create_backbone validation
# ------------------------------------------------------------------------------------------------
def test_create_backbone_rejects_misspelt_option():
    with pytest.raises(TypeError) as info:
        build("resnet18", (3, 32, 32), pretrainde=True)
    message = str(info.value)
    assert "'pretrainde'" in message and "did you mean 'pretrained'" in message
    for allowed in ("pretrained", "weights_path", "source", "small_input"):
        assert allowed in message
    with pytest.raises(TypeError, match="'depth'"):
        build("resnet20", (3, 32, 32), depth=32)


def test_create_backbone_names_and_required_options():
    with pytest.raises(RegistryError, match="resnet20"):
        build("resnet21", (3, 32, 32))
    with pytest.raises(TypeError, match="'model_name'"):
        build("timm", (3, 32, 32))
    with pytest.raises(ValueError, match="source"):
        build("resnet18", (3, 32, 32), source="caffe")
    model = build("openworld.models.backbones:cnn8", (1, 8, 8))
    assert model.out_features == 64


# ------------------------------------------------------------------------------------------------
# heads
# ------------------------------------------------------------------------------------------------
def test_cosine_classifier_hand_computed():
    head = CosineClassifier(2, 4, temperature=16.0)
    head.set_rows(0, torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-3.0, 0.0]]))
    z = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    expected = 16.0 * torch.tensor([[0.6, 0.8, 7.0 / (5.0 * math.sqrt(2.0)), -0.6], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(head(z), expected)
    sliced = head(z, num_active=2)
    assert sliced.shape == (2, 2)
    torch.testing.assert_close(sliced, expected[:, :2])
    assert head(z, num_active=0).shape == (2, 0)
    with pytest.raises(ValueError, match="num_active"):
        head(z, num_active=5)
    # scale invariance of both features and rows
    head2 = CosineClassifier(2, 4, temperature=16.0)
    head2.set_rows(0, 5.0 * head.weight.detach())
    torch.testing.assert_close(head2(7.0 * z), expected)
    assert head.weight.shape == (4, 2)
    assert not any("bias" in n for n, _ in head.named_parameters())


def test_gradient_reaches_only_active_rows():
    torch.manual_seed(0)
    head = CosineClassifier(8, 10, temperature=16.0)
    z = torch.randn(6, 8, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    F.cross_entropy(head(z, num_active=3), y).backward()
    assert head.weight.grad is not None
    assert torch.all(head.weight.grad[3:] == 0)
    assert torch.all(head.weight.grad[:3].abs().sum(dim=1) > 0)
    assert z.grad is not None and torch.isfinite(z.grad).all()

    linear = LinearClassifier(8, 10)
    F.cross_entropy(linear(z.detach(), num_active=3), y).backward()
    assert torch.all(linear.fc.weight.grad[3:] == 0) and torch.all(linear.fc.bias.grad[3:] == 0)
    assert linear.fc.bias.grad[:3].abs().sum() > 0


def test_linear_classifier_matches_nn_linear_on_active_rows():
    torch.manual_seed(0)
    head = LinearClassifier(5, 7)
    z = torch.randn(3, 5)
    full = F.linear(z, head.fc.weight, head.fc.bias)
    torch.testing.assert_close(head(z), full)
    torch.testing.assert_close(head(z, num_active=4), full[:, :4])


def test_classifier_net_composes_encoder_and_head():
    torch.manual_seed(0)
    encoder = build("mlp", (16,), hidden=[32], out_features=8)
    net = ClassifierNet(encoder, CosineClassifier(encoder.out_features, 5)).eval()
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert net.features(x).shape == (4, 8)
        torch.testing.assert_close(net(x, num_active=3), net.head(encoder(x), 3))
        assert net(x).shape == (4, 5)
    assert net.out_features == 8


# ------------------------------------------------------------------------------------------------
# determinism
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, input_size", [("resnet20", (3, 32, 32)), ("cnn28", (1, 28, 28)), ("mlp", (256,))])
def test_same_seed_same_model(name, input_size):
    def make(seed):
        torch.manual_seed(seed)
        model = build(name, input_size)
        head = CosineClassifier(model.out_features, 10)
        return ClassifierNet(model, head)

    a, b, c = make(1), make(1), make(2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
    x = torch.randn(4, *input_size)
    a.train(), b.train()
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
