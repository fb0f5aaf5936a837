"""Unit-level checks of one Send-VAE training step: where each loss's gradient goes."""

from pathlib import Path

import torch

from sendvae.commands.train_vae import add_arguments, resolve_config
from sendvae.losses.cosine import cosine_alignment_loss
from sendvae.runtime.distributed import DistInfo
from sendvae.runtime.log import RunLogger
from sendvae.train.vae import VAETrainer


def _trainer(tmp_path: Path, tiny_args, **overrides) -> VAETrainer:
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = resolve_config(p.parse_args(tiny_args(tmp_path, **overrides)))
    return VAETrainer(cfg, DistInfo(0, 1, 0, torch.device("cpu")), tmp_path / "run", RunLogger(None, False))


def _batch(tr: VAETrainer, n: int = 4) -> torch.Tensor:
    return torch.stack([tr.dataset[i][0] for i in range(n)])


def test_alignment_gradient_reaches_encoder_and_mapper_only(tmp_path, tiny_args):
    tr = _trainer(tmp_path, tiny_args)
    x = _batch(tr).float() / 127.5 - 1
    recon, post, z, pred = tr.model(x)
    target = tr.teacher_tokens(x)
    loss, cos = cosine_alignment_loss(pred, target)
    loss.backward()
    vae = tr.model.vae
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in vae.encoder.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in tr.model.head.parameters())
    assert all(p.grad is None for p in vae.decoder.parameters()), "alignment must not reach the decoder"
    assert all(p.grad is None and not p.requires_grad for p in tr.teacher.parameters())


def test_gan_changes_nothing_before_its_start_step(tmp_path, tiny_args):
    states = []
    for gan_weight in (0.1, 0.0):
        torch.manual_seed(0)
        tr = _trainer(
            tmp_path / str(gan_weight), tiny_args, **{"loss.gan_start": 3, "loss.gan_weight": gan_weight}
        )
        disc0 = {k: v.clone() for k, v in tr.disc.state_dict().items()} if tr.disc is not None else {}
        batch = _batch(tr)
        for _ in range(2):
            terms = tr.train_step(batch)
            tr.step += 1
            assert "g" not in terms and "d" not in terms
        if tr.disc is not None:
            for k, v in tr.disc.state_dict().items():
                assert torch.equal(v, disc0[k]), f"discriminator {k} changed before its start step"
        states.append({k: v.clone() for k, v in tr.model.vae.state_dict().items()})
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), f"GAN influenced {k} before its start step"


def test_gan_reaches_the_decoder_from_its_start_step(tmp_path, tiny_args):
    tr = _trainer(tmp_path, tiny_args, **{"loss.gan_start": 0})
    terms = tr.train_step(_batch(tr))
    assert "g" in terms and "d" in terms and torch.isfinite(terms["d"])
