"""The FID Inception port: TF1 resize, pt_inception key layout and features against pytorch-fid."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sendvae.metrics.conv_bn_relu import ConvBNReLU
from sendvae.metrics.inception import (
    WEIGHTS_FILE,
    FIDInceptionV3,
    _pool,
    load_fid_inception,
    tf1_bilinear_resize,
)


def _numpy_tf1_resize(img, out_h, out_w):
    """TF1 resize_bilinear (align_corners=False, no half-pixel centres) from its formula, (C, H, W).

    Source coordinates are float32 as in TF's kernel: src = float(i) * (float(in) / out).
    """
    c, h, w = img.shape
    sy_scale, sx_scale = np.float32(h) / np.float32(out_h), np.float32(w) / np.float32(out_w)
    out = np.zeros((c, out_h, out_w))
    for i in range(out_h):
        sy = float(np.float32(i) * sy_scale)
        y0 = math.floor(sy)
        y1, ly = min(y0 + 1, h - 1), sy - y0
        for j in range(out_w):
            sx = float(np.float32(j) * sx_scale)
            x0 = math.floor(sx)
            x1, lx = min(x0 + 1, w - 1), sx - x0
            top = (1 - lx) * img[:, y0, x0] + lx * img[:, y0, x1]
            bottom = (1 - lx) * img[:, y1, x0] + lx * img[:, y1, x1]
            out[:, i, j] = (1 - ly) * top + ly * bottom
    return out


@pytest.mark.parametrize("size_in,size_out", [((9, 13), (40, 31)), ((50, 47), (20, 12)), ((8, 8), (8, 8))])
def test_tf1_resize_matches_numpy_formula(size_in, size_out):
    x = torch.rand(2, 3, *size_in, dtype=torch.float64) * 255
    got = tf1_bilinear_resize(x.float(), size_out)
    for n in range(2):
        want = _numpy_tf1_resize(x[n].numpy(), *size_out)
        np.testing.assert_allclose(got[n].numpy(), want, atol=2e-4)


def _gather_tf1_resize(x, size):
    """TF1 resize by gathering every output pixel's four neighbours, float32: TF's lerp order (each row
    horizontally, then the two rows vertically), written out directly."""
    (h, w), (out_h, out_w) = x.shape[-2:], size

    def coords(n_in, n_out):
        src = torch.arange(n_out, dtype=torch.float32) * torch.tensor(n_in / n_out, dtype=torch.float32)
        i0 = src.floor().long().clamp(max=n_in - 1)
        return i0, (i0 + 1).clamp(max=n_in - 1), src - i0.float()

    (y0, y1, wy), (x0, x1, wx) = coords(h, out_h), coords(w, out_w)
    y0, y1, wy = y0[:, None], y1[:, None], wy[:, None]
    top = x[..., y0, x0] + (x[..., y0, x1] - x[..., y0, x0]) * wx
    bottom = x[..., y1, x0] + (x[..., y1, x1] - x[..., y1, x0]) * wx
    return top + (bottom - top) * wy


@pytest.mark.parametrize(
    "size_in,size_out", [((256, 256), (299, 299)), ((512, 384), (299, 299)), ((9, 13), (40, 31))]
)
def test_tf1_resize_row_gathers_are_bit_identical(size_in, size_out):
    """The two-pass row-gather implementation gives the same bits as gathering pixel by pixel, for NCHW
    and channels-last input (gathered as NHWC rows), and keeps the input's memory format."""
    x = torch.rand(2, 3, *size_in) * 255
    want = _gather_tf1_resize(x, size_out)
    got = tf1_bilinear_resize(x, size_out)
    assert torch.equal(got, want) and got.is_contiguous()
    got = tf1_bilinear_resize(x.contiguous(memory_format=torch.channels_last), size_out)
    assert torch.equal(got, want) and got.is_contiguous(memory_format=torch.channels_last)
    nhwc_uint8 = (x.round().to(torch.uint8)).permute(0, 2, 3, 1).contiguous()  # ADM's layout, as prepare
    as_float = nhwc_uint8.permute(0, 3, 1, 2).float()  # gives it: channels-last
    assert torch.equal(tf1_bilinear_resize(as_float, size_out), _gather_tf1_resize(as_float, size_out))


@pytest.mark.parametrize(
    "kind,stride,shape", [("avg", 1, (2, 32, 17, 17)), ("max", 1, (2, 32, 8, 8)), ("max", 2, (2, 16, 35, 35))]
)
def test_pools_bit_identical_to_nchw_kernels(kind, stride, shape):
    """On CPU the pools run channels-last for speed; results equal ATen's NCHW pooling exactly."""
    x = torch.randn(shape)
    if kind == "avg":
        want = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    else:
        want = F.max_pool2d(x, kernel_size=3, stride=stride, padding=1 if stride == 1 else 0)
    got = _pool(x, kind, stride)
    assert torch.equal(got, want) and got.is_contiguous()
    channels_last = _pool(x.contiguous(memory_format=torch.channels_last), kind, stride)
    assert torch.equal(channels_last, want) and channels_last.is_contiguous(memory_format=torch.channels_last)


def test_tf1_resize_hand_values_and_differs_from_half_pixel():
    x = torch.tensor([[[[0.0, 10.0, 30.0]]]])  # (1, 1, 1, 3) -> width 6: src = j / 2
    got = tf1_bilinear_resize(x, (1, 6))
    assert got.flatten().tolist() == [0.0, 5.0, 10.0, 20.0, 30.0, 30.0]
    half_pixel = F.interpolate(x, size=(1, 6), mode="bilinear", align_corners=False)
    assert not torch.allclose(got, half_pixel)


def test_tf1_resize_rejects_integer_input():
    with pytest.raises(ValueError, match="float"):
        tf1_bilinear_resize(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), (8, 8))


def _random_state_dict(seed=0):
    """Random weights with BN statistics calibrated on noise, so every layer has O(1) activations."""
    torch.manual_seed(seed)
    net = FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average: one batch sets the running stats to its own
    net.train()
    with torch.no_grad():
        net(torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8))
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        net.fc.bias.normal_()
    return net.state_dict()


def _unfolded(net, images):
    """net(images) through conv -> BN -> ReLU as written (ConvBNReLU folds BN only without autograd
    through the weights): the pt_inception arithmetic step by step."""
    net.requires_grad_(True)
    try:
        with torch.enable_grad():
            return {k: v.detach() for k, v in net(images).items()}
    finally:
        net.requires_grad_(False)


def test_features_match_pytorch_fid(tmp_path, monkeypatch):
    """Our module against pytorch-fid's FID Inception (torchvision Inception3 + FIDInception blocks).

    Conv -> BN -> ReLU as written gives pytorch-fid's features to the last bits (the same kernels on the
    same channels-last input); the evaluation path, BN folded into the convs (oneDNN's fused conv + ReLU
    on CPU), agrees to float32 rounding: within 1e-5 of the largest feature (measured ~1e-6; these
    random weights make pool_3 features up to ~1200, so an absolute 1e-4 is one float32 step there).
    """
    pytorch_fid_inception = pytest.importorskip("pytorch_fid.inception")
    state = _random_state_dict()
    path = tmp_path / WEIGHTS_FILE
    torch.save(state, path)
    ours = load_fid_inception(path)

    # pytorch-fid fetches its weights by URL; hand it the same random state dict instead.
    monkeypatch.setattr(pytorch_fid_inception, "load_state_dict_from_url", lambda *a, **k: dict(state))
    oracle = pytorch_fid_inception.fid_inception_v3().eval()  # strict load_state_dict: same key layout
    captured = {}
    oracle.avgpool.register_forward_hook(lambda m, i, o: captured.__setitem__("pool", o.flatten(1)))
    oracle.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.__setitem__("b1x1", o))

    torch.manual_seed(1)
    images = torch.randint(0, 256, (2, 299, 299, 3), dtype=torch.uint8)  # ADM layout, already 299
    with torch.no_grad():
        out = ours(images)
        logits_biased = oracle((images.permute(0, 3, 1, 2).float() - 128) / 128)
    spatial = captured["b1x1"][:, :7].permute(0, 2, 3, 1).reshape(2, -1)  # TF's NHWC order
    logits = logits_biased - oracle.fc.bias  # ADM's IS logits have no bias

    assert out["pool"].shape == (2, 2048) and out["spatial"].shape == (2, 2023)
    assert out["pool"].std() > 0.05  # non-degenerate features, so the comparison means something
    exact = _unfolded(ours, images)
    assert (exact["pool"] - captured["pool"]).abs().max() < 1e-4
    assert (exact["spatial"] - spatial).abs().max() < 1e-4
    for name, want in (("pool", captured["pool"]), ("spatial", spatial), ("logits", logits)):
        assert (out[name] - want).abs().max() < 1e-5 * want.abs().max(), name
    assert (out["logits"] - logits).abs().max() < 1e-3 * logits.abs().max()


def test_folded_bn_matches_unfolded_and_follows_weight_changes():
    """Eval without autograd folds each BN into its conv (cached): the features equal conv -> BN -> ReLU
    within 1e-5 relative, and a new state dict or an in-place edit of a BN statistic refolds."""
    net = FIDInceptionV3()
    net.load_state_dict(_random_state_dict(seed=0))
    net.eval().requires_grad_(False)
    torch.manual_seed(3)
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)

    def check():
        with torch.no_grad():
            folded = net(images)
        unfolded = _unfolded(net, images)
        for name in ("pool", "spatial", "logits"):
            err = (folded[name] - unfolded[name]).abs().max() / unfolded[name].abs().max()
            assert err < 1e-5, (name, err)
        return folded

    first = check()
    net.load_state_dict(_random_state_dict(seed=1))
    second = check()
    assert not torch.allclose(first["pool"], second["pool"])
    with torch.no_grad():
        net.Mixed_7c.branch_pool.bn.running_var.mul_(4.0)  # the last BN before pool_3
    third = check()
    assert not torch.allclose(second["pool"], third["pool"])
    assert copy.deepcopy(net).Mixed_7c.branch_pool._folded is None  # caches are not copied


@pytest.mark.parametrize("kernel,padding,stride", [(1, 0, 1), (3, 1, 1), (3, 0, 2), ((1, 7), (0, 3), 1)])
def test_conv_bn_relu_eval_paths_agree(kernel, padding, stride):
    """A ConvBNReLU in eval: the folded conv (oneDNN fused conv + ReLU on CPU where the build has it, with
    the weight packed per input shape) equals conv -> BN -> ReLU within 1e-5 relative, for NCHW and
    channels-last input and a change of input shape; an input that requires grad gets its gradient."""
    torch.manual_seed(4)
    m = ConvBNReLU(16, 24, kernel_size=kernel, padding=padding, stride=stride)
    with torch.no_grad():
        m.bn.running_mean.normal_()
        m.bn.running_var.uniform_(0.5, 2.0)
        m.bn.weight.uniform_(0.5, 1.5)
        m.bn.bias.uniform_(-0.5, 0.5)
    m.eval().requires_grad_(False)

    def reference(x):
        return F.relu(m.bn(m.conv(x)))

    for shape in ((2, 16, 13, 13), (3, 16, 9, 11), (2, 16, 13, 13)):
        x = torch.randn(shape)
        for inp in (x, x.contiguous(memory_format=torch.channels_last)):
            with torch.no_grad():
                got, want = m(inp), reference(inp)
            assert (got - want).abs().max() < 1e-5 * want.abs().max()
    x = torch.randn(2, 16, 13, 13, requires_grad=True)
    m(x).square().sum().backward()
    x_ref = x.detach().requires_grad_(True)
    reference(x_ref).square().sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)


def test_forward_same_features_for_every_uint8_layout():
    """uint8 NHWC (channels-last all the way from the resize) and NCHW input (resized NCHW, then copied
    channels-last) reach the convs as the same values: identical features."""
    net = FIDInceptionV3().eval().requires_grad_(False)
    torch.manual_seed(5)
    nhwc = torch.randint(0, 256, (2, 80, 72, 3), dtype=torch.uint8)
    with torch.no_grad():
        a, b = net(nhwc), net(nhwc.permute(0, 3, 1, 2).contiguous())
    for name in ("pool", "spatial", "logits"):
        assert torch.equal(a[name], b[name]), name


def test_input_conventions_agree():
    net = FIDInceptionV3().eval()
    torch.manual_seed(2)
    nhwc = torch.randint(0, 256, (1, 80, 80, 3), dtype=torch.uint8)
    nchw = nhwc.permute(0, 3, 1, 2)
    as_float = nchw.float() / 127.5 - 1  # the project's [-1, 1] model convention
    assert torch.equal(net.prepare(nhwc), net.prepare(nchw.contiguous()))
    assert torch.allclose(net.prepare(as_float), nchw.float(), atol=1e-4)
    with pytest.raises(ValueError, match="batch of images"):
        net.prepare(torch.zeros(3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="colour channels"):
        net.prepare(torch.zeros(1, 8, 8, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        net.prepare(torch.zeros(1, 8, 8, 3))


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE) as e:
        load_fid_inception(tmp_path / "missing.pth")
    assert "https://github.com/mseitzer/pytorch-fid/releases" in str(e.value)
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048), "extra.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="missing keys.*unexpected keys.*extra.weight"):
        load_fid_inception(bad)
    torch.save({"fc.weight": torch.zeros(1000, 2048)}, bad)
    with pytest.raises(ValueError, match="does not match"):
        load_fid_inception(bad)
