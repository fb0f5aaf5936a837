import pytest
import torch

from sendvae.models.discriminator import ActNorm, NLayerDiscriminator, load_discriminator
from sendvae.models.vae_io import CheckpointMismatchError


def test_output_shape_for_256_input():
    d = NLayerDiscriminator().eval()
    with torch.no_grad():
        out = d(torch.zeros(2, 3, 256, 256))
    assert out.shape == (2, 1, 30, 30)  # 256 -> 128 -> 64 -> 32 -> 31 -> 30
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        d(torch.zeros(2, 1, 64, 64))


def test_taming_key_layout_and_size():
    sd = NLayerDiscriminator().state_dict()
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    expected = ["main.0.weight", "main.0.bias", "main.2.weight", *[f"main.3.{s}" for s in bn]]
    expected += ["main.5.weight", *[f"main.6.{s}" for s in bn], "main.8.weight", *[f"main.9.{s}" for s in bn]]
    expected += ["main.11.weight", "main.11.bias"]
    assert list(sd) == expected  # convs before BatchNorm carry no bias
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["main.0.weight"] == (64, 3, 4, 4) and shapes["main.8.weight"] == (512, 256, 4, 4)
    assert shapes["main.11.weight"] == (1, 512, 4, 4)
    # 3*64*16 + 64 + 64*128*16 + 128*256*16 + 256*512*16 + 512*16 + 1 + 2 * (128 + 256 + 512)
    n = sum(p.numel() for p in NLayerDiscriminator().parameters())
    assert n == 3136 + 131072 + 524288 + 2097152 + 8193 + 2 * (128 + 256 + 512)


def test_init_statistics():
    torch.manual_seed(0)
    d = NLayerDiscriminator()
    w = d.main[8].weight  # 2.1M weights
    assert abs(w.mean().item()) < 1e-3 and abs(w.std().item() - 0.02) < 5e-4
    bn = torch.cat([d.main[i].weight for i in (3, 6, 9)])  # 896 values
    assert abs(bn.mean().item() - 1.0) < 5e-3 and abs(bn.std().item() - 0.02) < 3e-3
    assert all(torch.count_nonzero(d.main[i].bias) == 0 for i in (0, 3, 6, 9, 11))


def test_actnorm_variant_initialises_from_data():
    torch.manual_seed(0)
    d = NLayerDiscriminator(ndf=8, n_layers=2, use_actnorm=True)
    assert isinstance(d.main[3], ActNorm) and d.main[2].bias is not None
    feats = {}
    d.main[3].register_forward_hook(lambda m, i, o: feats.update(out=o.clone()))  # LeakyReLU is in-place
    d.train()(torch.randn(4, 3, 32, 32) * 3 + 1)
    out = feats["out"].transpose(0, 1).flatten(1)  # (C, B*H*W) after the first-batch init
    assert torch.allclose(out.mean(1), torch.zeros(16), atol=1e-4)
    assert torch.allclose(out.std(1), torch.ones(16), atol=1e-3)
    assert d.main[3].initialized.item() == 1


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": {**{f"loss.discriminator.{k}": v for k, v in sd.items()}, "encoder.x": 0}},
        lambda sd: {"discriminator": sd, "step": 5},
        lambda sd: {"model": {f"discriminator.{k}": v for k, v in sd.items()}},
    ],
)
def test_load_from_wrapped_checkpoints(tmp_path, wrap):
    torch.manual_seed(1)
    src = NLayerDiscriminator(ndf=16, n_layers=2)
    src.main[3].running_mean.normal_()
    path = tmp_path / "disc.pt"
    torch.save(wrap(src.state_dict()), path)
    d = load_discriminator(path)
    assert (d.ndf, d.n_layers, d.input_nc, d.use_actnorm) == (16, 2, 3, False)
    assert not d.training  # every loader returns an eval-mode model
    assert all(torch.equal(v, d.state_dict()[k]) for k, v in src.state_dict().items())


def test_load_actnorm_checkpoint_and_errors(tmp_path):
    src = NLayerDiscriminator(ndf=8, n_layers=3, use_actnorm=True)
    torch.save(src.state_dict(), tmp_path / "act.pt")
    d = load_discriminator(tmp_path / "act.pt")
    assert d.use_actnorm and d.n_layers == 3 and torch.equal(d.main[3].loc, src.main[3].loc)

    sd = NLayerDiscriminator(ndf=8).state_dict()
    sd["main.6.weight"] = torch.ones(3)  # a corrupted norm layer
    del sd["main.9.running_var"]
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointMismatchError) as e:
        load_discriminator(tmp_path / "bad.pt")
    msg = str(e.value)
    assert "NLayerDiscriminator(input_nc=3, ndf=8, n_layers=3" in msg
    assert "1 missing keys: main.9.running_var" in msg
    assert "main.6.weight: checkpoint (3,) vs model (32,)" in msg

    torch.save({"encoder.conv_in.weight": torch.zeros(1)}, tmp_path / "vae.pt")
    with pytest.raises(CheckpointMismatchError, match="main.0.weight"):
        load_discriminator(tmp_path / "vae.pt")
    with pytest.raises(FileNotFoundError):
        load_discriminator(tmp_path / "missing.pt")
