"""train-vae presets: their LPIPS, the standard-LPIPS weight check, the fixed latent normalisation."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from sendvae.cli import main
from sendvae.losses.lpips import LPIPSWeightsError
from sendvae.runtime import checkpoint as ckpt
from sendvae.runtime.log import read_stats

PAPER_PRESETS = (
    *("sendvae-f16d32", "sendvae-f8d4", "vavae-f16d32", "repa-align-f16d32", "reals-f16d32"),
    *("repae-f16d32", "repae-f8d4", "rae-dinov2-b"),
)
_LIN_CHANNELS = (64, 128, 256, 512, 512)  # VGG16 relu1_2 .. relu5_3


def _paper_tiny(out_dir, preset: str = "sendvae-f16d32", *extra: str) -> list[str]:
    """A paper preset shrunk to one step on 32 px shapes (tiny VAE, embedded teacher, small mapper and D)."""
    args = f"""--preset {preset} --output-dir {out_dir} --exp-name run --data.name shapes --resolution 32
        --batch-size 2 --max-steps 1 --vae tiny-f4d16 --enc-type efficientnet-lite0 --teacher.input_size 64
        --mapper.grid_mismatch resample_teacher --mapper.hidden_dim 32 --mapper.num_heads 2
        --mapper.projector_dim 64 --model.disc_ndf 8 --model.disc_layers 2 --data.num_workers 0
        --run.log_every 1 --run.ckpt_every 0 --run.sample_every 0 --run.stats_images 4"""
    return ["train-vae", *args.split(), *extra]


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_paper_presets_use_standard_lpips_vgg(preset, capsys):
    assert main(["train-vae", "--preset", preset, "--dry-run"]) == 0
    loss = json.loads(capsys.readouterr().out)["loss"]
    assert (loss["lpips_variant"], loss["lpips_net"], loss["lpips_weight"]) == ("lpips", "vgg", 1.0)


def test_other_presets_keep_the_bundled_stlpips():
    from sendvae.train.vae_config import PRESETS

    others = [name for name in PRESETS if name not in PAPER_PRESETS]
    assert "shapes-tiny" in others
    for name in others:  # the embedded / tiny presets run with no weight files given
        assert PRESETS.build(name).loss.lpips_variant == "stlpips", name


def _lpips_package_absent(monkeypatch):
    import sendvae.losses.lpips as lp

    find = lp._package_file
    monkeypatch.setattr(
        lp, "_package_file", lambda pkg, *parts: None if pkg == "lpips" else find(pkg, *parts)
    )


@pytest.mark.parametrize("lpips_installed", [True, False])
def test_missing_standard_lpips_weights_is_one_line_before_training(
    tmp_path, capsys, monkeypatch, lpips_installed
):
    assert issubclass(LPIPSWeightsError, FileNotFoundError)
    if not lpips_installed:
        _lpips_package_absent(monkeypatch)
    assert main(_paper_tiny(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.startswith("sendvae train-vae: error: standard LPIPS-VGG") and err.count("\n") == 1, err
    for part in (
        "vgg16-397923af.pth",
        "https://download.pytorch.org/models/vgg16-397923af.pth",
        "missing (not in",  # the trunk: torch's hub cache is empty in tests
        "--loss.lpips_trunk_weights PATH",
        "vgg.pth",
        "lpips pip package",
        "--loss.lpips_variant stlpips",
    ):
        assert part in err, part
    assert ("missing (lpips is not installed)" in err) != lpips_installed
    assert ("--loss.lpips_weights PATH" in err) != lpips_installed
    # nothing trained: no step logged, no checkpoint
    stats = tmp_path / "run" / "stats.jsonl"
    assert not (stats.exists() and read_stats(stats)) and ckpt.latest_checkpoint(tmp_path / "run") is None
    # a path given that is not there is named as given
    assert main(_paper_tiny(tmp_path, "sendvae-f16d32", "--loss.lpips_trunk_weights", "/no/vgg16.pth")) == 2
    assert "missing (--loss.lpips_trunk_weights /no/vgg16.pth: no such file)" in capsys.readouterr().err


def test_paper_preset_trains_with_standard_lpips_files(tmp_path, monkeypatch):
    import torchvision

    _lpips_package_absent(monkeypatch)  # the heads must come from the file given, not the package
    torch.manual_seed(0)
    with torch.device("meta"):  # the 500 MB classifier is never materialised (the loader ignores it)
        vgg = torchvision.models.vgg16()
    features = vgg.features.to_empty(device="cpu")
    for layer in features:
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.normal_(layer.bias, std=0.1)
    trunk = tmp_path / "vgg16-397923af.pth"  # torchvision's file name and key layout (features.*)
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, trunk)
    lins = tmp_path / "vgg.pth"  # the lpips package's layout: lin{k}.model.1.weight (dropout, then conv)
    torch.save(
        {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) * 0.2 for k, c in enumerate(_LIN_CHANNELS)}, lins
    )
    extra = ("--loss.lpips_trunk_weights", str(trunk), "--loss.lpips_weights", str(lins))
    assert main(_paper_tiny(tmp_path, "sendvae-f16d32", *extra)) == 0
    (row,) = read_stats(tmp_path / "run" / "stats.jsonl")
    assert row["step"] == 1 and 0 < row["lpips"] < float("inf")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["loss"]
    assert (saved["lpips_variant"], saved["lpips_net"], saved["lpips_trunk_weights"]) == (
        "lpips",
        "vgg",
        str(trunk),
    )


def test_random_lpips_needs_no_files():
    from sendvae.config import apply_overrides
    from sendvae.train.builders import build_lpips_for
    from sendvae.train.vae_config import PRESETS

    cfg = PRESETS.build("sendvae-f16d32")
    with pytest.raises(LPIPSWeightsError, match="vgg16-397923af.pth"):
        build_lpips_for(cfg)
    lpips = build_lpips_for(apply_overrides(cfg, {"loss.lpips_random_init": True}))  # benchmarks
    assert (lpips.variant, lpips.net) == ("lpips", "vgg")


# ---- --mapper.latent_norm fixed


class _Teacher(nn.Module):
    """Just the teacher's shape: width 16 on a 4x4 token grid."""

    embed_dim = 16

    def grid_size(self, resolution: int) -> tuple[int, int]:
        return (4, 4)


def _tiny_cfg(**overrides):
    from sendvae.config import apply_overrides
    from sendvae.train.vae_config import PRESETS

    base = {"data.resolution": 32, "run.stats_images": 6, "mapper.latent_norm": "fixed"}
    return apply_overrides(PRESETS.build("shapes-tiny"), {**base, **overrides})


def _vae_with_stats(seed: int = 0):
    from sendvae.models.vae_io import load_vae

    torch.manual_seed(seed)
    vae = load_vae("tiny-f4d16")
    mean, std = torch.randn(16) * 0.3, torch.rand(16) + 0.5
    vae.set_latent_stats(mean, std)
    return vae, mean, std


def test_fixed_norm_takes_the_vae_statistics():
    from sendvae.train.builders import build_head

    vae, mean, std = _vae_with_stats()
    head = build_head(_tiny_cfg(), vae, _Teacher())
    assert torch.equal(head.norm.running_mean, mean) and torch.equal(head.norm.running_var, std**2)
    assert bool(head.norm.stats_set)
    z = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(
        head.norm(z), (z - mean.view(1, -1, 1, 1)) / (std**2 + 1e-4).sqrt().view(1, -1, 1, 1)
    )


def test_fixed_norm_measures_a_vae_without_statistics():
    from sendvae.data import build_dataset
    from sendvae.models.vae_io import load_vae
    from sendvae.train.builders import build_head
    from sendvae.train.export import latent_statistics

    torch.manual_seed(0)
    vae = load_vae("tiny-f4d16")  # random init: latent_mean 0, latent_std 1, i.e. no statistics
    cfg = _tiny_cfg()
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    head = build_head(cfg, vae, _Teacher())
    # The export's measurement on the same images and seed, computed separately.
    mean, std = latent_statistics(vae, build_dataset(cfg.data, seed=cfg.run.seed), 6, seed=cfg.run.seed)
    assert std.ne(1).all() and mean.ne(0).all()
    torch.testing.assert_close(head.norm.running_mean, mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(head.norm.running_var, std**2, rtol=1e-6, atol=0)
    assert all(torch.equal(v, vae.state_dict()[k]) for k, v in before.items()), "the VAE is left as it was"


def _norm_stats(state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    model = state["model"]
    return model["head.norm.running_mean"], model["head.norm.running_var"]


def test_fixed_norm_trains_keeps_its_statistics_and_resumes(tmp_path, tiny_args):
    vae, mean, std = _vae_with_stats()
    vae.save_pretrained(tmp_path / "init-vae")  # the statistics travel in sendvae.json
    extra = {"mapper.latent_norm": "fixed", "vae-ckpt": tmp_path / "init-vae", "run.ckpt_every": 1}
    run = tmp_path / "run"
    assert main(["train-vae", *tiny_args(tmp_path, steps=2, **extra)]) == 0
    states = [ckpt.load_checkpoint(path) for _, path in ckpt.list_checkpoints(run)]
    assert [s["step"] for s in states] == [1, 2]
    for state in states:  # set before step 1, unchanged by the steps
        run_mean, run_var = _norm_stats(state)
        assert torch.equal(run_mean, mean) and torch.equal(run_var, std**2)
    # Running again with one more step resumes from step 2 and keeps the same statistics.
    assert main(["train-vae", *tiny_args(tmp_path, steps=3, **extra)]) == 0
    assert [r["step"] for r in read_stats(run / "stats.jsonl")] == [1, 2, 3]
    last = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))
    assert last["step"] == 3
    run_mean, run_var = _norm_stats(last)
    assert torch.equal(run_mean, mean) and torch.equal(run_var, std**2)
    # The weights did train: the mapper's patch embedding moved from step 2 to step 3.
    key = "head.patch_embed.weight"
    assert not torch.equal(states[-1]["model"][key], last["model"][key])
