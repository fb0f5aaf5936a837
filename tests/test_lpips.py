"""LPIPS / ST-LPIPS: metric properties, gradients, autocast, and equivalence with the reference packages."""

from __future__ import annotations

import copy
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

from sendvae.losses.lpips import LPIPS, LPIPSWeightsError, build_lpips

_CHANNELS = {"vgg": (64, 128, 256, 512, 512), "alex": (64, 192, 384, 256, 256)}


def _images(seed: int, b: int = 1, hw: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, hw, hw, generator=g) * 2 - 1
    # y: x plus smooth structured noise, closer to a reconstruction than an unrelated image.
    noise = F.interpolate(torch.randn(b, 3, hw // 8, hw // 8, generator=g), size=(hw, hw), mode="bilinear")
    return x, (x + 0.3 * noise).clamp(-1, 1)


@pytest.fixture(scope="module")
def st_vgg() -> LPIPS:
    return build_lpips()


@pytest.fixture(scope="module")
def stlpips_pkg():
    """The reference package, imported with stubs for the modules it imports but does not declare."""
    stubs = {}
    for name in ("IPython", "torchsummary"):
        try:
            __import__(name)
        except ImportError:
            stubs[name] = types.ModuleType(name)
    if "IPython" in stubs:
        stubs["IPython"].embed = lambda *a, **k: None
    if "torchsummary" in stubs:
        stubs["torchsummary"].summary = lambda *a, **k: None
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        from stlpips_pytorch import stlpips

        yield stlpips
    finally:
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod


def test_identity_and_positive(st_vgg: LPIPS):
    x, y = _images(0)
    # One batched call: (x, x), (x, y), (y, x), (x, -x).
    with torch.no_grad():
        d_same, d_diff, d_swap, d_far = st_vgg(torch.cat([x, x, y, x]), torch.cat([x, y, x, -x]))
    assert d_same.abs() < 1e-6
    assert d_diff > 1e-3
    assert (d_swap - d_diff).abs() < 1e-6  # symmetric
    assert d_far > d_diff  # a much larger change is farther


def test_frozen_and_differentiable(st_vgg: LPIPS):
    st_vgg.train()
    assert not st_vgg.training and not any(m.training for m in st_vgg.modules())
    assert not any(p.requires_grad for p in st_vgg.parameters())
    x, y = _images(1, hw=32)
    x.requires_grad_(True)
    st_vgg(x, y).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in st_vgg.parameters())


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_matches_stlpips_package(stlpips_pkg, net: str):
    # The package's own model and weight file; built on the meta device to skip initialising the unused
    # VGG classifier, then filled from the file the way its constructor does (strict=False).
    with torch.device("meta"):
        ref = stlpips_pkg.LPIPS(net=net, variant="shift_tolerant", pretrained=False, verbose=False)
    ref.to_empty(device="cpu").eval()
    path = Path(stlpips_pkg.__file__).parent / "weights" / "vST0.0" / f"{net}_shift_tolerant.pth"
    missing, unexpected = ref.load_state_dict(torch.load(path, map_location="cpu"), strict=False)
    assert not unexpected and all(k.startswith("lins.") for k in missing)  # lins.k aliases lin{k}
    ours = build_lpips("stlpips", net)
    x, y = _images(2)
    with torch.no_grad():
        expected = ref(x, y).flatten()
        got = ours(x, y)
    assert (expected - got).abs().max() < 1e-5
    assert expected.min() > 1e-3  # the comparison is not between two zeros


def test_autocast_bf16_close_to_fp32():
    model = build_lpips(net="alex")
    x, y = _images(3)
    with torch.no_grad():
        full = model(x, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, y)
    assert low.dtype == torch.float32
    assert torch.allclose(low, full, rtol=0.1, atol=1e-3)


def _reference_lpips(trunk: torch.nn.Sequential, taps, lin_weights, x, y) -> torch.Tensor:
    """LPIPS written out from the paper: scale, trunk, unit-normalise, square, 1x1 head, mean, sum."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    hx, hy = (x - shift) / scale, (y - shift) / scale
    total = torch.zeros(x.shape[0])
    for level, tap in enumerate(taps):
        start = 0 if level == 0 else taps[level - 1] + 1
        for layer in trunk[start : tap + 1]:
            hx, hy = layer(hx), layer(hy)
        fx = hx / (hx.norm(dim=1, keepdim=True) + 1e-10)
        fy = hy / (hy.norm(dim=1, keepdim=True) + 1e-10)
        total += F.conv2d((fx - fy) ** 2, lin_weights[level]).mean((1, 2, 3))
    return total


@pytest.fixture(scope="module")
def standard_files(tmp_path_factory) -> dict[str, tuple[Path, Path, torch.nn.Sequential]]:
    """Random torchvision trunks and random lin heads saved in the published key layouts."""
    tmp = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(0)
    out = {}
    for net in ("vgg", "alex"):
        with torch.device("meta"):  # skip initialising the large classifier heads
            model = torchvision.models.vgg16() if net == "vgg" else torchvision.models.alexnet()
        features = model.features.to_empty(device="cpu").eval()
        for layer in features:
            if isinstance(layer, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                torch.nn.init.normal_(layer.bias, std=0.1)
        trunk_path, lin_path = tmp / f"{net}_trunk.pth", tmp / f"{net}_lin.pth"
        torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, trunk_path)
        lins = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) * 0.2 for k, c in enumerate(_CHANNELS[net])}
        torch.save(lins, lin_path)
        out[net] = (trunk_path, lin_path, features)
    return out


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_standard_lpips_matches_direct_computation(standard_files, net: str):
    trunk_path, lin_path, features = standard_files[net]
    ours = build_lpips("lpips", net, weights=lin_path, trunk_weights=trunk_path)
    lins = torch.load(lin_path)
    lin_weights = [lins[f"lin{k}.model.1.weight"] for k in range(5)]
    taps = (3, 8, 15, 22, 29) if net == "vgg" else (1, 4, 7, 9, 11)  # relu1_2 .. relu5_3 / relu1 .. relu5
    x, y = _images(4)
    with torch.no_grad():
        expected = _reference_lpips(features, taps, lin_weights, x, y)
        got = ours(x, y)
    assert expected.min() > 1e-4
    assert (expected - got).abs().max() < 1e-5


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_standard_lpips_matches_lpips_package(standard_files, monkeypatch, net: str):
    lpips_pkg = pytest.importorskip("lpips")
    trunk_path, lin_path, features = standard_files[net]
    # The package asks torchvision for an ImageNet model; hand it our random trunk instead (no download).
    fake = lambda *args, **kwargs: types.SimpleNamespace(features=copy.deepcopy(features))
    monkeypatch.setattr(lpips_pkg.pretrained_networks.tv, "vgg16" if net == "vgg" else "alexnet", fake)
    ref = lpips_pkg.LPIPS(net=net, pnet_rand=True, model_path=str(lin_path), verbose=False)
    ours = build_lpips("lpips", net, weights=lin_path, trunk_weights=trunk_path)
    x, y = _images(5, b=1)
    with torch.no_grad():
        expected = ref(x, y).flatten()
        got = ours(x, y)
    assert expected.min() > 1e-4
    assert (expected - got).abs().max() < 1e-5


def test_missing_files_raise_clear_errors(tmp_path):
    with pytest.raises(LPIPSWeightsError, match="trunk_weights"):
        build_lpips("lpips", "vgg", weights=tmp_path / "lin.pth")
    with pytest.raises(LPIPSWeightsError, match="not found"):
        build_lpips("lpips", "vgg", weights=tmp_path / "lin.pth", trunk_weights=tmp_path / "vgg16.pth")
    with pytest.raises(ValueError, match="unknown LPIPS net"):
        build_lpips("stlpips", "squeeze")
    with pytest.raises(ValueError, match="at least 18 px"):
        LPIPS(pretrained=False)(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16))


def test_wrong_file_is_rejected(tmp_path, standard_files):
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, tmp_path / "partial.pth")
    with pytest.raises(LPIPSWeightsError, match=r"missing \['features.0.bias'"):
        build_lpips("stlpips", "alex", weights=tmp_path / "partial.pth")
    trunk_path, lin_path, _ = standard_files["vgg"]
    with pytest.raises(LPIPSWeightsError, match=r"wrong shape \['features.0.weight'"):
        build_lpips("lpips", "alex", weights=lin_path, trunk_weights=trunk_path)


def _joint_pass(model: LPIPS, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The earlier forward: one trunk pass over cat([x, y]), both halves in the autograd graph."""
    b = x.shape[0]
    h = (torch.cat([x, y]).float() - model.shift) / model.scale
    dist = torch.zeros(b)
    level = 0
    for i, layer in enumerate(model.features):
        h = layer(h)
        if i != model.taps[level]:
            continue
        f = h.float() * torch.rsqrt(h.float().square().sum(1, keepdim=True) + 1e-20)
        dist = dist + ((f[:b] - f[b:]).square().mean((2, 3)) * model.lins[level].weight.view(1, -1)).sum(1)
        level += 1
        if level == len(model.taps):
            break
    return dist


def _saved_activation_bytes(model: LPIPS, fn) -> int:
    """Bytes of the activations (not the weights) autograd keeps for the backward pass while fn() runs."""
    weights = {p.data_ptr() for p in model.parameters()}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if t.data_ptr() not in weights:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


@pytest.mark.parametrize("variant, net", [("lpips", "vgg"), ("stlpips", "alex")])
def test_target_pass_builds_no_graph_same_value_and_gradient(variant: str, net: str):
    torch.manual_seed(0)
    model = LPIPS(variant, net, pretrained=False)
    x, y = _images(6, b=2, hw=32)
    recon = x.clone().requires_grad_(True)  # the reconstruction; y is the target
    # Reference: the joint pass of both halves, its value and its gradient w.r.t. the reconstruction.
    ref = _joint_pass(model, recon, y)
    (ref_grad,) = torch.autograd.grad(ref.sum(), recon)
    # Which trunk outputs carry a graph: a forward hook on every tap layer.
    seen: list[tuple[int, bool]] = []
    hooks = [
        model.features[t].register_forward_hook(lambda m, i, o: seen.append((o.shape[0], o.grad_fn is None)))
        for t in model.taps
    ]
    got = model(recon, y)
    for h in hooks:
        h.remove()
    (got_grad,) = torch.autograd.grad(got.sum(), recon)
    assert ref.min() > 1e-4
    assert (got - ref.detach()).abs().max() <= 1e-6
    # The gradient is small (about 1e-4 here): within 1e-6 absolute is loose, so hold it to 1e-5 relative.
    assert (got_grad - ref_grad).abs().max() <= 1e-5 * ref_grad.abs().max()
    # Each tap saw the reconstruction (with a graph) and the target (without one), never a joint batch.
    assert sorted(seen) == sorted([(2, False), (2, True)] * len(model.taps)), seen
    # So autograd keeps about half as much: only the reconstruction's activations.
    joint = _saved_activation_bytes(model, lambda: _joint_pass(model, recon, y))
    split = _saved_activation_bytes(model, lambda: model(recon, y))
    assert split < 0.6 * joint, (split, joint)


def test_target_that_requires_grad_still_gets_one():
    torch.manual_seed(0)
    model = LPIPS("lpips", "vgg", pretrained=False)
    x, y = _images(7, hw=32)
    y.requires_grad_(True)
    (g,) = torch.autograd.grad(model(x, y).sum(), y)
    (g_ref,) = torch.autograd.grad(_joint_pass(model, x, y).sum(), y)
    assert g.abs().sum() > 0 and (g - g_ref).abs().max() <= 1e-5 * g_ref.abs().max()


def test_standard_files_found_in_the_usual_places(tmp_path, monkeypatch, standard_files):
    import sendvae.losses.lpips as lp

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    assert lp.find_standard_files("vgg")[0] is None  # an empty hub cache
    cached = tmp_path / "torch-home" / "hub" / "checkpoints" / "vgg16-397923af.pth"
    cached.parent.mkdir(parents=True)
    trunk_path, lin_path, _ = standard_files["vgg"]
    cached.write_bytes(trunk_path.read_bytes())
    monkeypatch.setattr(lp, "lin_package_path", lambda net: lin_path)  # stands in for an installed lpips
    assert lp.find_standard_files("vgg") == (cached, lin_path)
    assert lp.find_standard_files("vgg", trunk_weights=tmp_path / "nope.pth") == (None, lin_path)
    x, y = _images(8, hw=32)
    explicit = build_lpips("lpips", "vgg", weights=lin_path, trunk_weights=trunk_path)
    with torch.no_grad():
        assert torch.equal(build_lpips("lpips", "vgg")(x, y), explicit(x, y))
