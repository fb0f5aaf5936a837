import argparse
import dataclasses

import pytest

from sendvae.config import (
    add_config_arguments,
    apply_overrides,
    from_dict,
    option,
    overrides_from_args,
    parse_value,
    to_dict,
)


@dataclasses.dataclass
class Inner:
    lr: float = option(1e-4, "learning rate")
    betas: tuple[float, float] = option((0.9, 0.999), "betas")
    kind: str = option("a", "kind", choices=("a", "b"))
    steps: int | None = option(None, "steps")
    flag: bool = option(False, "flag")


@dataclasses.dataclass
class Outer:
    name: str = option("x", "name")
    inner: Inner = option(Inner(), "inner")


def test_parse_value_types():
    assert parse_value("3", int) == 3
    assert parse_value("true", bool) is True and parse_value("off", bool) is False
    assert parse_value("none", int | None) is None
    assert parse_value("0.5,0.9", tuple[float, float]) == (0.5, 0.9)
    with pytest.raises(ValueError):
        parse_value("maybe", bool)


def test_overrides_and_roundtrip():
    cfg = Outer()
    new = apply_overrides(
        cfg, {"inner.lr": "3e-4", "inner.betas": "0.5,0.95", "inner.steps": "10", "inner.flag": "yes"}
    )
    assert (
        new.inner.lr == 3e-4 and new.inner.betas == (0.5, 0.95) and new.inner.steps == 10 and new.inner.flag
    )
    assert cfg.inner.lr == 1e-4, "overrides must not mutate the original"
    assert from_dict(Outer, to_dict(new)) == new


def test_bad_overrides_are_clear():
    with pytest.raises(ValueError, match="unknown config key"):
        apply_overrides(Outer(), {"inner.nope": "1"})
    with pytest.raises(ValueError, match="not one of"):
        apply_overrides(Outer(), {"inner.kind": "c"})
    with pytest.raises(ValueError, match="inner.lr"):
        apply_overrides(Outer(), {"inner.lr": "fast"})
    with pytest.raises(ValueError, match="unknown Outer keys"):
        from_dict(Outer, {"bogus": 1})


def test_argparse_flags_from_dataclass():
    p = argparse.ArgumentParser()
    add_config_arguments(p, Outer)
    args = p.parse_args(["--inner.lr", "0.01", "--name", "y"])
    ov = overrides_from_args(args)
    assert ov == {"inner.lr": "0.01", "name": "y"}
    assert apply_overrides(Outer(), ov).inner.lr == 0.01


def test_train_vae_presets_resolve():
    from sendvae.train.vae_config import PRESETS

    for name in PRESETS:
        cfg = PRESETS.build(name)
        assert from_dict(type(cfg), to_dict(cfg)) == cfg
    paper = PRESETS.build("sendvae-f16d32")
    # REFERENCE.md section 1: global batch 1024, AdamW lr 3e-4, 80 epochs, lambda_align 1, KL 1e-6, GAN 0.1.
    assert (paper.optim.batch_size, paper.optim.lr, paper.optim.epochs) == (1024, 3e-4, 80.0)
    assert (paper.loss.align_weight, paper.loss.kl_weight, paper.loss.gan_weight) == (1.0, 1e-6, 0.1)
    assert paper.mapper.depth == 1 and paper.mapper.noise and paper.teacher.enc_type == "dinov2-vit-b"
    with pytest.raises(ValueError, match="shapes-tiny"):
        PRESETS.build("nope")


def test_testing_aids_work_but_are_not_in_help(capsys):
    import pytest

    from sendvae.cli import main

    with pytest.raises(SystemExit):
        main(["train-vae", "--help"])
    out = capsys.readouterr().out
    assert "--run.fault" not in out and "--run.seed" in out
    assert main(["train-vae", "--run.fault_exit_step", "3", "--dry-run"]) == 0
    assert '"fault_exit_step": 3' in capsys.readouterr().out


# -- validation at the boundary: flags, presets and saved configs are held to one set of rules ------------


def _one_error(capsys, argv) -> str:
    """Run ``sendvae ARGV``: it must fail with exit code 2 and exactly one stderr line, no traceback."""
    from sendvae.cli import main

    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], (code, err)
    return err[0]


def _saved(tmp_path, data) -> str:
    import json

    path = tmp_path / "run" / "config.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize(
    "section, key, value, says",
    [
        ("run", "precision", "fp64", "is not one of auto, bf16, fp32"),  # trained bf16
        ("model", "ema", "false", "expected true or false"),  # a string: EMA on
        ("loss", "recon", "l3", "is not one of l1, mse"),  # trained MSE
        ("optim", "batch_size", 2.5, "expected an integer"),
        ("optim", "batch_size", True, "expected an integer"),
        ("optim", "batch_size", 0, "below the minimum 1"),
        ("optim", "betas", [0.9], "expected a list of 2 numbers"),
        ("optim", "lr", "fast", "expected a number"),
        ("run", "log_every", 0, "below the minimum 1"),
        ("run", "device", "banana", "must be a device"),
        ("run", "exp_name", None, None),  # allowed: Optional
    ],
)
def test_saved_config_values_are_checked(tmp_path, capsys, section, key, value, says):
    """A saved config's values meet the field's type and domain; the error names the file and the key."""
    from sendvae.cli import main

    path = _saved(tmp_path, {"preset": "shapes-tiny", section: {key: value}})
    if says is None:
        assert main(["train-vae", "--config", path, "--dry-run"]) == 0
        return
    err = _one_error(capsys, ["train-vae", "--config", path, "--dry-run"])
    assert f"{path}: {section}.{key}: " in err and says in err, err


def test_saved_config_starts_from_its_preset(tmp_path, capsys):
    """A key (or a whole section) the file lacks takes its recorded preset's value, not the dataclass's."""
    import json

    from sendvae.cli import main

    path = _saved(tmp_path, {"format": 1, "preset": "shapes-tiny", "run": {"seed": 3}})
    assert main(["train-vae", "--config", path, "--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["format"] == 2 and cfg["run"]["seed"] == 3
    assert cfg["optim"]["batch_size"] == 8 and cfg["loss"]["recon"] == "mse"  # shapes-tiny's
    assert cfg["run"]["log_every"] == 25 and cfg["model"]["vae"] == "tiny-f4d16"
    err = _one_error(capsys, ["train-vae", "--config", _saved(tmp_path, {"preset": "nope"}), "--dry-run"])
    assert "preset: unknown train-vae preset 'nope'; one of custom, " in err
    err = _one_error(capsys, ["train-vae", "--config", _saved(tmp_path, {"format": 99}), "--dry-run"])
    assert "format: version 99" in err
    err = _one_error(capsys, ["train-vae", "--config", _saved(tmp_path, {"run": [1]}), "--dry-run"])
    assert "run: expected an object" in err


def test_testing_aids_are_not_read_from_a_file(tmp_path, capsys):
    from sendvae.cli import main

    path = _saved(tmp_path, {"preset": "shapes-tiny", "run": {"fault_exit_step": 1}})
    err = _one_error(capsys, ["train-vae", "--config", path, "--dry-run"])
    assert "run.fault_exit_step: a testing aid is not read from a file" in err
    # at its default (what older config.json files hold) it is passed over
    at_default = {"fault_exit_step": None, "fault_nan_steps": []}
    path = _saved(tmp_path, {"preset": "shapes-tiny", "run": at_default})
    assert main(["train-vae", "--config", path, "--dry-run"]) == 0


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--batch-size", "0"], "--batch-size"),  # IndexError
        (["--batch-size", "-4"], "--batch-size"),
        (["--run.log_every", "0"], "--run.log_every"),  # ZeroDivisionError
        (["--device", "banana"], "--device"),
        (["--run.ckpt_every", "-1"], "--run.ckpt_every"),  # accepted
        (["--optim.batch_size", "0"], "--optim.batch_size"),
        (["--lr", "nan"], "--lr"),
        (["--optim.betas", "0.9,1.0"], "--optim.betas"),
        (["--mapper.latent_norm", "batch"], "--mapper.latent_norm"),
        (["--sit.class_dropout", "1.5"], "--sit.class_dropout"),
    ],
)
def test_bad_flags_are_one_line(capsys, argv, flag):
    err = _one_error(capsys, ["train-vae", *argv, "--dry-run"])
    assert f"{flag}: " in err, err


def test_train_sit_flags_checked(capsys):
    for argv in (["--batch-size", "0"], ["--transport.logit_std", "0"], ["--eval.fd_samples", "1"]):
        assert f"{argv[0]}: " in _one_error(capsys, ["train-sit", *argv, "--dry-run"])


def test_every_preset_meets_its_domains():
    from sendvae.config import validate
    from sendvae.train.sit_config import PRESETS as SIT
    from sendvae.train.vae_config import PRESETS as VAE

    for presets in (VAE, SIT):
        for name in presets:
            validate(presets.build(name))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line(tmp_path, capsys, tiny_args):
    err = _one_error(capsys, ["train-vae", *tiny_args(tmp_path, steps=1), "--device", "cuda"])
    assert "--device cuda: no CUDA GPU is available" in err


def test_boundary_values_run(tmp_path, capsys, tiny_args):
    """Every domain admits its boundary: a run at batch 1, log and checkpoint cadences at their minimum."""
    import json

    from sendvae.cli import main

    bounds = {"optim.batch_size": 1, "run.log_every": 1, "run.ckpt_every": 0, "run.keep_ckpts": 0,
              "run.sample_every": 0, "run.stats_images": 2, "loss.gan_start": 0, "optim.warmup_steps": 0,
              "optim.grad_clip": 0, "optim.weight_decay": 0, "optim.betas": "0,0.999",
              "model.ema_decay": 1, "mapper.norm_momentum": 1, "run.seed": 0, "optim.max_steps": 1,
              "loss.lpips_weight": 0}  # fmt: skip
    assert main(["train-vae", *tiny_args(tmp_path, steps=1, **bounds)]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["format"] == 2 and saved["optim"]["batch_size"] == 1
    assert "fault_exit_step" not in saved["run"]  # testing aids at their defaults are not recorded
    capsys.readouterr()
    assert main(["train-vae", "--config", str(tmp_path / "run"), "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out) == saved


def test_train_sit_config_of_layout_1_reads_its_teachers(tmp_path, capsys):
    """Layout 1 spelled train-sit's teachers as data.teacher* and eval.fd_teacher*; read, they land in the
    one TeacherConfig spelling (--teacher.*, --eval.fd_teacher.*), and are written back in layout 2."""
    import json

    from sendvae.cli import main

    old = {"format": 1, "preset": "shapes-tiny", "data": {"teacher": "efficientnet-lite0",
           "teacher_weights": "w.pt", "teacher_random_init": True},
           "eval": {"fd_teacher": "efficientnet-lite0", "fd_teacher_weights": "f.pt"}}  # fmt: skip
    for data in (old, {k: v for k, v in old.items() if k != "format"}):  # no key: layout 1 too
        assert main(["train-sit", "--config", _saved(tmp_path, data), "--dry-run"]) == 0
        cfg = json.loads(capsys.readouterr().out)
        assert cfg["format"] == 2 and "teacher" not in cfg["data"]
        assert cfg["teacher"] == {"enc_type": "efficientnet-lite0", "weights": "w.pt", "random_init": True,
                                  "allow_download": False, "input_size": None}  # fmt: skip
        assert cfg["eval"]["fd_teacher"]["weights"] == "f.pt" and "fd_teacher_weights" not in cfg["eval"]
