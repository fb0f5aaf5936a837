import math

import pytest
import torch
import torch.nn.functional as F

from sendvae.models.vae import VAE_CONFIGS, AttnBlock, AutoencoderKL, DiagonalGaussian, VAEConfig


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _meta_model(name: str) -> AutoencoderKL:
    with torch.device("meta"):  # shapes only: counts without allocating 80M floats
        return AutoencoderKL(VAE_CONFIGS[name])


def test_f8d4_param_counts_match_sd_vae():
    m = _meta_model("f8d4")
    assert _count(m) == 83_653_863  # 83.65M, the SD-VAE
    assert _count(m.encoder) == 34_163_592  # 34.16M
    assert _count(m.decoder) == 49_490_179  # 49.49M
    assert m.downsample_factor == 8 and m.latent_channels == 4


def test_f16d32_param_count_and_attention_placement():
    m = _meta_model("f16d32")
    assert _count(m) == 69_836_067  # 69.84M
    assert m.downsample_factor == 16 and m.latent_channels == 32
    keys = m.state_dict().keys()
    # attention at 16x16 for 256 px input: level 4 only, after every res block
    assert VAE_CONFIGS["f16d32"].attn_levels == [4]
    assert "encoder.down.4.attn.1.q.weight" in keys and "encoder.down.3.attn.0.q.weight" not in keys
    assert "decoder.up.4.attn.2.proj_out.weight" in keys and "decoder.up.3.attn.0.k.weight" not in keys


def test_ldm_key_layout():
    keys = set(_meta_model("f8d4").state_dict())
    for k in [
        "encoder.conv_in.weight",
        "encoder.down.0.block.1.norm2.bias",
        "encoder.down.1.block.0.nin_shortcut.weight",  # 128 -> 256
        "encoder.down.2.downsample.conv.weight",
        "encoder.mid.block_1.conv1.weight",
        "encoder.mid.attn_1.q.weight",
        "encoder.mid.attn_1.proj_out.bias",
        "encoder.norm_out.weight",
        "encoder.conv_out.weight",
        "quant_conv.weight",
        "post_quant_conv.weight",
        "decoder.mid.block_2.conv2.weight",
        "decoder.up.3.block.2.conv1.weight",  # decoder levels have num_res_blocks + 1 blocks
        "decoder.up.1.upsample.conv.weight",
        "decoder.conv_out.bias",
        "latent_mean",
        "latent_std",
    ]:
        assert k in keys, k
    assert "encoder.down.3.downsample.conv.weight" not in keys  # deepest level keeps its size
    assert "decoder.up.0.upsample.conv.weight" not in keys  # full-resolution level does not upsample
    assert _meta_model("f8d4").state_dict()["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)


@pytest.mark.parametrize("name", ["tiny-f8d4", "tiny-f16d32"])
def test_tiny_presets_train_step(name):
    """Two optimizer steps of a tiny preset: shapes, gradients everywhere, and small enough for CPU tests.

    How fast a step runs is a benchmark, not a test: ``sendvae bench vae --vae tiny-f8d4`` (this step:
    encode, decode, backward) and ``sendvae bench train-vae --vae tiny-f8d4 --enc-type efficientnet-lite0``
    (the whole Send-VAE step) measure the tiny presets.
    """
    torch.manual_seed(0)
    vae = AutoencoderKL(VAE_CONFIGS[name])
    assert _count(vae) < 500_000
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    for _ in range(2):
        recon, post = vae(x)
        loss = (recon - x).abs().mean() + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    f = vae.downsample_factor
    assert recon.shape == x.shape
    assert post.mean.shape == (2, vae.latent_channels, 64 // f, 64 // f)
    assert all(p.grad is not None for p in vae.parameters())


def test_diagonal_gaussian_against_hand_formulas():
    torch.manual_seed(0)
    moments = torch.randn(3, 8, 2, 5)
    moments[0, 4:, 0, 0] = 50.0  # above the clamp
    g = DiagonalGaussian(moments)
    mean, logvar = moments[:, :4], moments[:, 4:].clamp(-30, 20)
    assert torch.equal(g.mean, mean) and torch.equal(g.logvar, logvar) and g.logvar.max() == 20
    assert torch.allclose(g.std, torch.exp(0.5 * logvar)) and torch.allclose(g.var, torch.exp(logvar))
    assert torch.equal(g.mode(), mean)
    # KL(N(m, s^2) || N(0, 1)) summed over (C, h, w), via torch.distributions
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, torch.exp(0.5 * logvar)), torch.distributions.Normal(0.0, 1.0)
    ).sum(dim=(1, 2, 3))
    assert g.kl().shape == (3,)
    assert torch.allclose(g.kl(), ref, rtol=1e-5)
    hand = 0.5 * (mean[1] ** 2 + logvar[1].exp() - 1 - logvar[1]).sum()
    assert torch.allclose(g.kl()[1], hand)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(g.sample(torch.Generator().manual_seed(7)), mean + torch.exp(0.5 * logvar) * eps)
    assert not torch.equal(g.sample(), g.sample())


def test_attention_block_matches_explicit_softmax():
    torch.manual_seed(0)
    cfg = VAEConfig(ch=16, ch_mult=(1,), norm_groups=4)
    attn = AttnBlock(16, cfg)
    x = torch.randn(2, 16, 3, 5)
    h = attn.norm(x)
    q, k, v = (m(h).flatten(2) for m in (attn.q, attn.k, attn.v))  # (B, C, N)
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(16), dim=-1)  # (B, N, N)
    out = torch.einsum("bij,bcj->bci", w, v).reshape(2, 16, 3, 5)
    assert torch.allclose(attn(x), x + attn.proj_out(out), atol=1e-5)


def test_input_errors_are_informative():
    vae = AutoencoderKL(VAE_CONFIGS["tiny-f8d4"])
    with pytest.raises(ValueError, match=r"36x40.*downsampling factor 8"):
        vae.encode(torch.zeros(1, 3, 36, 40))
    with pytest.raises(ValueError, match="expected 3 image channels, got 1"):
        vae.encode(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        vae.encode(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match=r"latents \(B, 4, h, w\)"):
        vae.decode(torch.zeros(1, 32, 4, 4))
    assert vae.latent_grid(256) == (32, 32) and vae.latent_grid((64, 128)) == (8, 16)
    with pytest.raises(ValueError, match="not divisible by norm_groups"):
        VAEConfig(ch=24, norm_groups=32)


def test_latent_stats_normalisation_round_trip():
    vae = AutoencoderKL(VAE_CONFIGS["tiny-f8d4"])
    z = torch.randn(2, 4, 3, 3)
    assert torch.equal(vae.normalize_latents(z), z)  # defaults: mean 0, std 1
    vae.set_latent_stats(torch.tensor([0.5, -1.0, 0.0, 2.0]).view(1, 4, 1, 1), [1.0, 2.0, 0.5, 4.0])
    zn = vae.normalize_latents(z)
    assert torch.allclose(zn[:, 1], (z[:, 1] + 1.0) / 2.0)
    assert torch.allclose(vae.denormalize_latents(zn), z, atol=1e-6)
    assert vae.normalize_latents(z.bfloat16()).dtype == torch.bfloat16
    sd = vae.state_dict()
    assert torch.equal(sd["latent_std"], torch.tensor([1.0, 2.0, 0.5, 4.0]))
    with pytest.raises(ValueError, match="4 values"):
        vae.set_latent_stats(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="std > 0"):
        vae.set_latent_stats(torch.zeros(4), torch.zeros(4))


def test_grad_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    vae = AutoencoderKL(VAE_CONFIGS["tiny-f16d32"])
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    grads = []
    for flag in (False, True):
        vae.grad_checkpointing = flag
        vae.zero_grad()
        recon, post = vae(x, sample=False)
        (recon.square().mean() + post.kl().mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in vae.parameters()]))
    assert vae.encoder.grad_checkpointing and vae.decoder.grad_checkpointing
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_forward_sample_vs_mode():
    torch.manual_seed(0)
    vae = AutoencoderKL(VAE_CONFIGS["tiny-f8d4"]).eval()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        r_mode, post = vae(x, sample=False)
        r_a, _ = vae(x, generator=torch.Generator().manual_seed(1))
        r_b, _ = vae(x, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(r_mode, vae.decode(post.mean))
    assert torch.equal(r_a, r_b) and not torch.allclose(r_a, r_mode)
    assert F.mse_loss(r_a, r_mode) > 0


def test_bf16_autocast_forward():
    vae = AutoencoderKL(VAE_CONFIGS["tiny-f16d32"])
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recon, post = vae(x)
    assert recon.dtype == torch.bfloat16 and recon.shape == x.shape
    assert post.kl().dtype == torch.float32 and torch.isfinite(post.kl()).all()
