"""The Send-VAE mapper h_phi: token grids, noise injection, latent normalisation, sin-cos positions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from sendvae.align.latent_norm import LatentNorm
from sendvae.align.mapper import GridMismatchError, Mapper, MapperConfig, resolve_patch_size
from sendvae.align.vf import VFProjector
from sendvae.losses.cosine import cosine_alignment_loss
from sendvae.models.layers import sincos_pos_embed_2d

TINY = dict(hidden_dim=32, num_heads=2, projector_dim=16)


def tiny(**kw) -> MapperConfig:
    return MapperConfig(**{**TINY, **kw})


@pytest.mark.parametrize(
    "latent_grid, teacher_grid, p",
    [((32, 32), (16, 16), 2), ((16, 16), (16, 16), 1), ((64, 64), (32, 32), 2), ((32, 64), (8, 16), 4)],
)
def test_resolve_patch_size(latent_grid, teacher_grid, p):
    assert resolve_patch_size(latent_grid, teacher_grid) == p


@pytest.mark.parametrize(
    "channels, latent, teacher, tokens",
    [
        (4, 32, 16, 256),  # f8d4 at 256 px + DINOv2-B at 224
        (4, 64, 32, 1024),  # f8d4 at 512 px + DINOv2-B at 448
        (32, 16, 16, 256),  # f16d32 at 256 px + DINOv2-B at 224
    ],
)
def test_forward_shapes_and_grids(channels, latent, teacher, tokens):
    m = Mapper(channels, (latent, latent), 768, (teacher, teacher), tiny())
    assert m.token_grid == (teacher, teacher) and not m.needs_teacher_resample
    out = m(torch.randn(2, channels, latent, latent))
    assert out.shape == (2, tokens, 768) and out.dtype == torch.float32


def test_grid_mismatch_error_names_grids_and_options():
    with pytest.raises(GridMismatchError) as err:
        Mapper(4, (30, 30), 768, (16, 16), tiny())
    msg = str(err.value)
    assert "30x30" in msg and "16x16" in msg and "resample_teacher" in msg
    with pytest.raises(GridMismatchError):  # an explicit patch size that misses the teacher grid
        Mapper(4, (32, 32), 768, (16, 16), tiny(patch_size=4))
    with pytest.raises(ValueError, match="does not divide"):
        Mapper(4, (32, 32), 768, (16, 16), tiny(patch_size=3))


def test_grid_mismatch_resample_teacher():
    # 30x30 latents vs 16x16 teacher: p=2 -> 15x15 = 225 tokens, the count closest to 256.
    m = Mapper(4, (30, 30), 768, (16, 16), tiny(grid_mismatch="resample_teacher"))
    assert m.patch_size == 2 and m.token_grid == (15, 15) and m.needs_teacher_resample
    assert m(torch.randn(1, 4, 30, 30)).shape == (1, 225, 768)
    # f16 latents at 256 px (16x16) vs a 448 px teacher (32x32): keep every latent position.
    m = Mapper(32, (16, 16), 768, (32, 32), tiny(grid_mismatch="resample_teacher"))
    assert m.patch_size == 1 and m.token_grid == (16, 16)


def test_from_teacher():
    class FakeTeacher:
        embed_dim = 48

        def grid_size(self, resolution: int) -> tuple[int, int]:
            return (resolution * 224 // 256 // 14,) * 2

    m = Mapper.from_teacher(4, (64, 64), FakeTeacher(), tiny(), resolution=512)
    assert m.teacher_grid == (32, 32) and m.patch_size == 2
    assert m(torch.randn(1, 4, 64, 64)).shape == (1, 1024, 48)


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_depths(depth):
    m = Mapper(4, (8, 8), 24, (4, 4), tiny(depth=depth))
    assert len(m.blocks) == depth
    assert isinstance(m.final_norm, nn.Identity) == (depth == 0)
    out = m(torch.randn(2, 4, 8, 8))
    assert out.shape == (2, 16, 24) and torch.isfinite(out).all()


def _expected_params(c: int, p: int, h: int, depth: int, proj: int, d: int, mlp: int) -> int:
    patch = c * p * p * h + h
    block = 2 * 2 * h + (h * 3 * h + 3 * h) + (h * h + h) + (h * mlp + mlp) + (mlp * h + h)
    final = 2 * h if depth else 0
    projector = (h * proj + proj) + (proj * proj + proj) + (proj * d + d)
    return patch + depth * block + final + projector


@pytest.mark.parametrize("channels, latent, p", [(4, 32, 2), (32, 16, 1)])
def test_paper_size_parameter_count(channels, latent, p):
    m = Mapper(channels, (latent, latent), 768, (16, 16))  # default config: depth 1, width 768
    assert m.num_heads == 12 and m.patch_size == p
    assert m.num_params() == _expected_params(channels, p, 768, 1, 2048, 768, 3072)
    assert m.num_params() == sum(m.num_params(k) for k in ("patch_embed", "blocks", "projector")) + 2 * 768


def test_heads_default_for_1024():
    assert Mapper(4, (4, 4), 1024, (4, 4), MapperConfig(projector_dim=8)).num_heads == 16


def test_sincos_matches_formula():
    dim, (h, w) = 16, (3, 5)
    pe = sincos_pos_embed_2d(dim, (h, w))
    assert pe.shape == (h * w, dim)
    q = dim // 4
    for n in range(h * w):
        row, col = divmod(n, w)
        for half, pos in enumerate((col, row)):  # first half: column index, second half: row index
            for k in range(q):
                angle = pos / 10000 ** (k / q)
                assert pe[n, half * 2 * q + k].item() == pytest.approx(math.sin(angle), abs=1e-6)
                assert pe[n, half * 2 * q + q + k].item() == pytest.approx(math.cos(angle), abs=1e-6)
    m = Mapper(4, (6, 10), 16, (3, 5), tiny(hidden_dim=16))
    assert torch.equal(m.pos_embed, pe) and "pos_embed" not in m.state_dict()
    assert all(p is not m.pos_embed for p in m.parameters())


def _patch_input(m: Mapper, z: torch.Tensor, **kw) -> torch.Tensor:
    """What the patch embedding sees for latents z."""
    seen = []
    handle = m.patch_embed.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach()))
    m(z, **kw)
    handle.remove()
    return seen[0]


def test_noise_injection_formula():
    torch.manual_seed(0)
    m = Mapper(4, (8, 8), 24, (4, 4), tiny(latent_norm="none")).train()
    z, eps, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0.0, 0.3, 1.0])
    x = _patch_input(m, z, t=t, noise=eps)
    tb = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(x, (1 - tb) * z + tb * eps, rtol=0, atol=1e-6)
    assert torch.equal(x[2], eps[2]) and torch.equal(x[0], z[0])
    torch.testing.assert_close(_patch_input(m, z, t=tb, noise=eps), x)  # t as (B, 1, 1, 1)
    torch.testing.assert_close(_patch_input(m, z, t=0.25, noise=eps), 0.75 * z + 0.25 * eps)
    # With the running norm the noise goes onto the batch-standardised latents.
    m = Mapper(4, (8, 8), 24, (4, 4), tiny()).train()
    z = 3.0 + 2.0 * torch.randn(3, 4, 8, 8)
    var, mean = torch.var_mean(z, dim=(0, 2, 3), correction=0, keepdim=True)
    zn = (z - mean) / torch.sqrt(var + m.config.norm_eps)
    torch.testing.assert_close(_patch_input(m, z, t=t, noise=eps), (1 - tb) * zn + tb * eps)


def test_noise_is_sampled_in_training_and_off_in_eval():
    m = Mapper(4, (8, 8), 24, (4, 4), tiny(latent_norm="none"))
    z = torch.randn(2, 4, 8, 8)
    m.train()
    assert not torch.equal(_patch_input(m, z), _patch_input(m, z))
    m.eval()
    torch.testing.assert_close(_patch_input(m, z), z)
    assert not torch.equal(_patch_input(m, z, add_noise=True), z)  # asked for explicitly
    m.train()
    assert torch.equal(_patch_input(m, z, add_noise=False), z)
    m_off = Mapper(4, (8, 8), 24, (4, 4), tiny(latent_norm="none", noise=False)).train()
    assert torch.equal(_patch_input(m_off, z), z)


def test_logit_normal_t_sampling():
    m = Mapper(4, (8, 8), 24, (4, 4), tiny(latent_norm="none", t_sampling="logit_normal")).train()
    z = torch.zeros(4096, 4, 1, 1).expand(-1, -1, 8, 8)
    eps = torch.ones_like(z)
    torch.manual_seed(0)
    t = m.add_noise(z, noise=eps)[:, 0, 0, 0]  # z_t = t when z = 0, eps = 1
    torch.manual_seed(0)
    torch.testing.assert_close(t, torch.sigmoid(torch.randn(4096)))
    with pytest.raises(ValueError, match="t_sampling"):
        Mapper(4, (8, 8), 24, (4, 4), tiny(t_sampling="beta"))


def test_running_norm_matches_batchnorm():
    torch.manual_seed(0)
    norm, bn = LatentNorm(3, "running", momentum=0.1, eps=1e-4), nn.BatchNorm2d(3, 1e-4, 0.1, affine=False)
    for _ in range(3):
        z = torch.randn(4, 3, 5, 5) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) + 1.5
        zg, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
        w = torch.randn_like(z)
        (norm(zg) * w).sum().backward()
        (bn(zb) * w).sum().backward()
        torch.testing.assert_close(zg.grad, zb.grad)  # gradients flow through the batch statistics
    torch.testing.assert_close(norm.running_mean, bn.running_mean)
    torch.testing.assert_close(norm.running_var, bn.running_var)
    norm.eval(), bn.eval()
    torch.testing.assert_close(norm(z), bn(z))


def test_running_stats_converge_to_data_stats():
    torch.manual_seed(0)
    mean, std = torch.tensor([2.0, -1.0, 0.5, 0.0]), torch.tensor([3.0, 0.5, 1.0, 2.0])
    norm = LatentNorm(4, "running", momentum=0.1).train()
    for _ in range(80):  # the initial (0, 1) has decayed to 0.9^80 = 2e-4 of its weight
        norm(mean.view(1, 4, 1, 1) + std.view(1, 4, 1, 1) * torch.randn(16, 4, 8, 8))
    # Errors in units of each channel's std. Measured over torch seeds 0-19, worst channel: mean error
    # min 0.006, mean 0.010, max 0.017; std error min 0.003, mean 0.008, max 0.016. Margin: 0.04.
    assert ((norm.running_mean - mean) / std).abs().max() < 0.04, norm.running_mean
    assert ((norm.running_var.sqrt() - std) / std).abs().max() < 0.04, norm.running_var
    norm.eval()
    y = norm(mean.view(1, 4, 1, 1) + std.view(1, 4, 1, 1) * torch.randn(64, 4, 8, 8))
    var, mu = torch.var_mean(y, dim=(0, 2, 3))
    # seeds 0-19, worst channel: |mean| min 0.008, mean 0.023, max 0.036; |var - 1| min 0.015, mean 0.038,
    # max 0.082 (the running estimate's error plus 4096 samples' own). Margins: 0.08 and 0.15.
    torch.testing.assert_close(mu, torch.zeros(4), atol=0.08, rtol=0)
    torch.testing.assert_close(var, torch.ones(4), atol=0.15, rtol=0)


def test_fixed_norm_uses_vae_stats():
    m = Mapper(4, (8, 8), 24, (4, 4), tiny(latent_norm="fixed", noise=False)).train()
    with pytest.raises(RuntimeError, match="set_latent_stats"):
        m(torch.randn(1, 4, 8, 8))
    mean, std = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.5, 1.0, 2.0, 4.0])
    m.set_latent_stats(mean, std)
    z = torch.randn(2, 4, 8, 8)
    expected = (z - mean.view(1, 4, 1, 1)) / torch.sqrt(std.view(1, 4, 1, 1) ** 2 + 1e-4)
    torch.testing.assert_close(_patch_input(m, z), expected)
    torch.testing.assert_close(m.norm.running_mean, mean)  # training does not move fixed statistics


def test_bad_latent_shape():
    m = Mapper(4, (8, 8), 24, (4, 4), tiny())
    with pytest.raises(ValueError, match=r"\(B, 4, 8x8\)"):
        m(torch.randn(1, 4, 16, 16))


def test_gradient_reaches_latents_and_all_parameters():
    torch.manual_seed(0)
    m = Mapper(4, (8, 8), 24, (4, 4), tiny(depth=1, qk_norm=True)).train()
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    loss, _ = cosine_alignment_loss(m(z), torch.randn(2, 16, 24))
    loss.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bf16_autocast_forward():
    m = Mapper(4, (8, 8), 24, (4, 4), tiny()).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(torch.randn(2, 4, 8, 8).bfloat16())
        loss, _ = cosine_alignment_loss(out, torch.randn(2, 16, 24))
    assert out.dtype == torch.bfloat16 and loss.dtype == torch.float32 and torch.isfinite(loss)
    assert m.norm.running_mean.dtype == torch.float32


def test_vf_projector():
    proj = VFProjector(4, 24)
    z = torch.randn(2, 4, 8, 8)
    out = proj(z)
    assert out.shape == (2, 64, 24) and proj.proj.bias is None
    torch.testing.assert_close(out[1, 8 * 3 + 5], proj.proj.weight[:, :, 0, 0] @ z[1, :, 3, 5])


def _sync_worker(rank: int, world: int, init_file: str, z: torch.Tensor, w: torch.Tensor, out: dict) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        norm = LatentNorm(3, "running").train()
        shard = z[:2] if rank == 0 else z[2:]  # unequal shards: 2 and 3 samples
        zs = shard.clone().requires_grad_()
        y = norm(zs)
        (y * (w[:2] if rank == 0 else w[2:])).sum().backward()
        out[rank] = (y.detach(), zs.grad, norm.running_mean.clone(), norm.running_var.clone())
    finally:
        torch.distributed.destroy_process_group()


def test_statistics_are_synced_across_ranks(tmp_path):
    """Two gloo ranks with unequal shards give the single-process result on the whole batch."""
    torch.manual_seed(0)
    z, w = torch.randn(5, 3, 4, 4) * 2 + 1, torch.randn(5, 3, 4, 4)
    with mp.Manager() as manager:
        shared = manager.dict()
        # fork: the children need not re-import torch (CPU only, so safe); spawn costs seconds more.
        args = (2, str(tmp_path / "init"), z, w, shared)
        mp.start_processes(_sync_worker, args=args, nprocs=2, start_method="fork")
        out = dict(shared)
    norm = LatentNorm(3, "running").train()
    zg = z.clone().requires_grad_()
    y = norm(zg)
    (y * w).sum().backward()
    torch.testing.assert_close(torch.cat([out[0][0], out[1][0]]), y.detach())
    torch.testing.assert_close(torch.cat([out[0][1], out[1][1]]), zg.grad)
    for rank in (0, 1):
        torch.testing.assert_close(out[rank][2], norm.running_mean)
        torch.testing.assert_close(out[rank][3], norm.running_var)
