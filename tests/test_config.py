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
