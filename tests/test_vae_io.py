import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from sendvae.models.vae import VAE_CONFIGS, AutoencoderKL, VAEConfig
from sendvae.models.vae_diffusers import diffusers_to_ldm, ldm_to_diffusers
from sendvae.models.vae_io import CheckpointMismatchError, infer_vae_config, load_vae

diffusers = pytest.importorskip("diffusers")

SD_VAE = dict(  # the SD-VAE (kl-f8) config of diffusers
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    latent_channels=4,
    layers_per_block=2,
    sample_size=256,
)


@torch.no_grad()
def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random (GroupNorm affine included), scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if p.ndim == 1:
            p.copy_(1.0 + 0.3 * r if "norm" in name and name.endswith("weight") else 0.3 * r)
        else:
            p.copy_(r / p[0].numel() ** 0.5)


def _tiny_ckpt_state(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    vae = AutoencoderKL(VAE_CONFIGS[name])
    _randomize(vae, seed)
    return vae.state_dict()


@pytest.fixture(scope="module")
def sd_vae_folder(tmp_path_factory):
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**SD_VAE).eval()
    _randomize(ref)
    path = tmp_path_factory.mktemp("sd-vae")
    ref.save_pretrained(path)
    return ref, path


def test_diffusers_sd_vae_equivalence(sd_vae_folder):
    ref, path = sd_vae_folder
    ours = load_vae(str(path)).eval()
    assert ours.config.ch_mult == (1, 2, 4, 4) and ours.config.embed_dim == 4
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        dist, post = ref.encode(x).latent_dist, ours.encode(x)
        assert dist.mean.abs().max() > 0.1  # not a degenerate comparison
        assert (dist.mean - post.mean).abs().max() < 1e-4
        assert (dist.logvar - post.logvar).abs().max() < 1e-4
        z = dist.mean
        a, b = ref.decode(z).sample, ours.decode(z)
    assert a.abs().max() > 0.1 and (a - b).abs().max() < 1e-4


def test_save_pretrained_round_trips_through_diffusers(tmp_path):
    ours = AutoencoderKL(VAE_CONFIGS["tiny-f8d4"]).eval()
    _randomize(ours, 2)
    ours.set_latent_stats(torch.tensor([0.1, -0.2, 0.3, 0.0]), torch.tensor([1.5, 2.0, 0.5, 1.0]))
    out = ours.save_pretrained(tmp_path / "export")
    assert {p.name for p in out.iterdir()} == {
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "sendvae.json",
    }
    back = diffusers.AutoencoderKL.from_pretrained(out).eval()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["block_out_channels"] == [16, 32, 32, 32] and cfg["latents_std"] == [1.5, 2.0, 0.5, 1.0]
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        z = ours.encode(x).mean
        assert z.abs().max() > 0.1
        assert (back.encode(x).latent_dist.mean - z).abs().max() < 1e-5
        assert (back.decode(z).sample - ours.decode(z)).abs().max() < 1e-5
    again = load_vae(str(out))
    assert again.config == ours.config  # sendvae.json keeps what diffusers' config cannot (e.g. norm_eps)
    assert torch.allclose(again.latent_std, torch.tensor([1.5, 2.0, 0.5, 1.0]))
    assert torch.allclose(again.latent_mean, torch.tensor([0.1, -0.2, 0.3, 0.0]))
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in ours.state_dict().items())
    ours.save_pretrained(out)  # over an existing export: files replaced in place
    assert len(list(out.iterdir())) == 3


def test_level_attention_maps_to_diffusers_attn_blocks(tmp_path):
    """A tiny f16d32-style model (attention at the deepest level) against diffusers' Attn*Block2D."""
    ours = AutoencoderKL(VAE_CONFIGS["tiny-f16d32"]).eval()
    _randomize(ours, 3)
    ours.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["down_block_types"][-1] == "AttnDownEncoderBlock2D" and cfg["down_block_types"][0] == (
        "DownEncoderBlock2D"
    )
    assert cfg["up_block_types"][0] == "AttnUpDecoderBlock2D"  # diffusers lists decoder blocks deepest first
    ref = diffusers.AutoencoderKL.from_pretrained(tmp_path).eval()
    assert set(ldm_to_diffusers(ours.state_dict(), 5)) == set(ref.state_dict())
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        dist, post = ref.encode(x).latent_dist, ours.encode(x)
        assert (dist.mean - post.mean).abs().max() < 1e-4 and (dist.logvar - post.logvar).abs().max() < 1e-4
        assert (ref.decode(post.mean).sample - ours.decode(post.mean)).abs().max() < 1e-4


def test_key_table_is_its_own_inverse():
    sd = {k: v for k, v in _tiny_ckpt_state("tiny-f16d32").items() if not k.startswith("latent_")}
    back = diffusers_to_ldm(ldm_to_diffusers(sd, 5), 5)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    old = {"decoder.mid_block.attentions.0.query.weight": torch.zeros(8, 8)}  # diffusers < 0.14 names
    assert diffusers_to_ldm(old, 5)["decoder.mid.attn_1.q.weight"].shape == (8, 8, 1, 1)


def test_ldm_ckpt_with_prefix_and_extra_keys(tmp_path):
    sd = _tiny_ckpt_state("tiny-f8d4")
    full = {f"first_stage_model.{k}": v for k, v in sd.items() if not k.startswith("latent_")}
    full["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(3)
    full["cond_stage_model.transformer.weight"] = torch.zeros(2)
    path = tmp_path / "sd.ckpt"
    torch.save({"state_dict": full, "global_step": 10}, path)
    vae = load_vae(str(path), config="tiny-f8d4")
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in sd.items())


def test_shape_inference_and_repae_layout(tmp_path, caplog):
    # GroupNorm groups are invisible in weights; inference assumes LDM's 32
    cfg = VAEConfig(
        ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(128,), z_channels=8, embed_dim=8
    )
    vae = AutoencoderKL(cfg)
    _randomize(vae, 5)
    sd = {k: v for k, v in vae.state_dict().items() if not k.startswith("latent_")}
    assert infer_vae_config(sd) == cfg
    sit = {"x_embedder.proj.weight": torch.zeros(4)}
    path = tmp_path / "e2e-vae.pt"
    torch.save({"model": sit, "ema": sit, "vae": sd}, path)
    # REPA-E keeps latent stats beside the checkpoint as 1/std ("scale") and mean ("bias")
    torch.save(
        {"latents_scale": torch.full((1, 8, 1, 1), 0.5), "latents_bias": torch.ones(1, 8, 1, 1)},
        tmp_path / "e2e-vae-latents-stats.pt",
    )
    with caplog.at_level(logging.INFO, logger="sendvae.models.vae_io"):
        loaded = load_vae(str(path))
    assert "inferred from tensor shapes" in caplog.text
    assert loaded.config == cfg
    assert torch.equal(loaded.encoder.down[1].attn[0].q.weight, vae.encoder.down[1].attn[0].q.weight)
    assert torch.allclose(loaded.latent_std, torch.full((8,), 2.0))
    assert torch.allclose(loaded.latent_mean, torch.ones(8))


def test_safetensors_files_ldm_and_diffusers_names(tmp_path):
    sd = {k: v for k, v in _tiny_ckpt_state("tiny-f16d32").items() if not k.startswith("latent_")}
    save_file(sd, str(tmp_path / "ldm.safetensors"))
    save_file(ldm_to_diffusers(sd, 5), str(tmp_path / "dif.safetensors"))
    for name in ("ldm.safetensors", "dif.safetensors"):
        vae = load_vae(str(tmp_path / name), config="tiny-f16d32")
        assert torch.equal(
            vae.state_dict()["decoder.up.4.attn.1.q.weight"], sd["decoder.up.4.attn.1.q.weight"]
        )


def test_wrong_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "f16.pt"
    torch.save(_tiny_ckpt_state("tiny-f16d32"), path)
    with pytest.raises(CheckpointMismatchError) as e:
        load_vae(str(path), config="tiny-f8d4")
    msg = str(e.value)
    assert "missing keys" in msg and "unexpected keys" in msg and "shape mismatches" in msg
    assert "expected architecture f8d4" in msg and "looks like f16d32" in msg
    assert "decoder.up.4.attn.0.q.weight" in msg  # names the offending tensors
    assert "encoder.down.1.block.0.conv1.weight: checkpoint (16, 16, 3, 3) vs model (32, 16, 3, 3)" in msg
    assert isinstance(e.value, ValueError)
    vae = load_vae(str(path), config="tiny-f8d4", strict=False)  # loads what fits
    assert torch.equal(vae.encoder.conv_in.weight, torch.load(path)["encoder.conv_in.weight"])


def test_presets_and_bad_sources(tmp_path):
    vae = load_vae("tiny-f8d4")
    assert isinstance(vae, AutoencoderKL) and vae.config == VAE_CONFIGS["tiny-f8d4"]
    with pytest.raises(FileNotFoundError, match="tiny-f16d32"):
        load_vae("no-such-vae")
    with pytest.raises(ValueError, match="unknown VAE config 'nope'"):
        load_vae("tiny-f8d4", config="nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vae(str(tmp_path / "empty"))
    torch.save({"optimizer": {"lr": torch.tensor(1.0)}}, tmp_path / "opt.pt")
    with pytest.raises(CheckpointMismatchError, match="encoder.conv_in.weight"):
        load_vae(str(tmp_path / "opt.pt"))
    torch.save({"cfg": VAEConfig()}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="weights_only"):
        load_vae(str(tmp_path / "pickled.pt"))
