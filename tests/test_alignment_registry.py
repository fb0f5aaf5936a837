"""The alignment registry (align/): each variant builds, trains, logs and exports what its entry
declares, ``--loss.align`` offers exactly the registry, and no code outside it branches on the variant."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
from pathlib import Path

import pytest
import torch

import sendvae
from sendvae.align import ALIGNMENTS, CLEAN_LATENT, NOISY_LATENT, AlignInputs, Alignment, load_exported_head
from sendvae.align.names import VARIANTS, VariantInfo
from sendvae.align.vf import vf_loss
from sendvae.cli import main
from sendvae.config import from_dict
from sendvae.losses.cosine import cosine_alignment_loss
from sendvae.runtime import checkpoint as ckpt
from sendvae.runtime.log import read_stats
from sendvae.train.vae_config import LossConfig, TrainVAEConfig

from .conftest import tiny_train_args

NAMES = list(ALIGNMENTS)
PACKAGE = Path(sendvae.__file__).parent
ALIGN = PACKAGE / "align"  # the variants' own package


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One 1-step ``sendvae train-vae`` run per registered variant on the embedded data, exported."""
    root = tmp_path_factory.mktemp("align-runs")
    with pytest.MonkeyPatch.context() as mp:  # the autouse private torch home, at module scope
        mp.setenv("TORCH_HOME", str(root / "torch-home"))
        for name in NAMES:
            args = tiny_train_args(root, exp=f"run-{name}", steps=1, **{"loss.align": name})
            assert main(["train-vae", *args]) == 0
    return root


def _trainer(tmp_path: Path, name: str, **overrides):
    from sendvae.commands.train_vae import add_arguments, resolve_config
    from sendvae.runtime.distributed import DistInfo
    from sendvae.runtime.log import RunLogger
    from sendvae.train.vae import VAETrainer

    p = argparse.ArgumentParser()
    add_arguments(p)
    cheap = {"loss.lpips_weight": 0, "loss.gan_weight": 0, "loss.align": name}
    cfg = resolve_config(p.parse_args(tiny_train_args(tmp_path, **{**cheap, **overrides})))
    return cfg, VAETrainer(
        cfg, DistInfo(0, 1, 0, torch.device("cpu")), tmp_path / "run", RunLogger(None, False)
    )


def _batch(tr, n: int = 4) -> torch.Tensor:
    return torch.stack([tr.dataset[i][0] for i in range(n)])


# ---------------------------------------------------------------------------------------------------------
# The option and the entries


def test_loss_align_choices_are_the_registry(tmp_path, capsys):
    field = next(f for f in dataclasses.fields(LossConfig) if f.name == "align")
    assert (
        field.metadata["choices"] == tuple(ALIGNMENTS) == ("none", "repa", "vf", "sendvae", "reals", "repae")
    )
    assert all(f"{a.name}: {a.help}" in field.metadata["help"] for a in ALIGNMENTS.values())
    assert main(["train-vae", *tiny_train_args(tmp_path), "--loss.align", "cosine", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "--loss.align" in err and all(name in err for name in NAMES), err


@pytest.mark.parametrize("name", NAMES)
def test_entry_is_complete(name):
    a = ALIGNMENTS[name]
    assert a.name == name and a.help
    has_head = a.build_head is not None
    assert a.needs_teacher == has_head == (a.loss is not None)  # today's variants: all three or none
    assert ("align" in a.logged) == (a.loss is not None) and len(set(a.logged)) == len(a.logged)
    assert (a.export is not None) == bool(a.exports) and (not a.exports or has_head)
    assert (a.load is not None) == bool(a.exports)  # what is exported can be read back


PUBLISHED = {  # variant -> (its L_align from the loss functions, whether lambda_align is adaptive by default)
    "sendvae": (lambda p, t, c: cosine_alignment_loss(p, t)[0], False),
    "repa": (lambda p, t, c: cosine_alignment_loss(p, t)[0], False),
    "vf": (lambda p, t, c: vf_loss(p, t, c.vf_margin_cos, c.vf_margin_dist)[0], True),
    # ReaLS from its formula: the head's first token is the global feature, the pooled teacher its target
    "reals": (
        lambda p, t, c: (
            c.reals_patch_weight * (1 - torch.cosine_similarity(p[:, 1:], t, dim=-1).mean())
            + c.reals_global_weight * (1 - torch.cosine_similarity(p[:, 0], t.mean(1), dim=-1).mean())
        ),
        False,
    ),
    # REPA-E's VAE alignment: REPA's projection loss, minus the mean token cosine
    "repae": (lambda p, t, c: -torch.cosine_similarity(p, t, dim=-1).mean(), False),
}
EXTRA_TOKENS = {"reals": 1}  # a head output's tokens beyond the teacher's (ReaLS: its global feature)


def test_every_variant_with_a_loss_is_checked_against_its_published_loss():
    assert set(PUBLISHED) == {n for n, a in ALIGNMENTS.items() if a.loss is not None}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_entry_loss_is_the_published_loss_and_logs_its_keys(name):
    torch.manual_seed(0)
    weights = {"reals_patch_weight": 0.7, "reals_global_weight": 0.4}
    a, cfg = ALIGNMENTS[name], LossConfig(vf_margin_cos=0.3, vf_margin_dist=0.1, **weights)
    reference, adaptive = PUBLISHED[name]
    pred = torch.randn(2, 16 + EXTRA_TOKENS.get(name, 0), 8, requires_grad=True)
    target = torch.randn(2, 16, 8)
    loss, terms = a.loss(AlignInputs(pred, target), cfg)
    torch.testing.assert_close(loss, reference(pred, target, cfg))
    assert set(terms) | {"align"} == set(a.logged) and all(not t.requires_grad for t in terms.values())
    assert a.adaptive(LossConfig()) is adaptive and a.adaptive(LossConfig(vf_adaptive=False)) is False


# ---------------------------------------------------------------------------------------------------------
# Each variant end to end: built, one step on the embedded data, logged, exported


@pytest.mark.parametrize("name", NAMES)
def test_variant_logs_exactly_its_declared_keys(runs, name):
    row = read_stats(runs / f"run-{name}" / "stats.jsonl")[-1]
    base = read_stats(runs / "run-none" / "stats.jsonl")[-1]  # the variant with nothing to log
    declared = set(ALIGNMENTS[name].logged) | set(ALIGNMENTS[name].cotrained_logged)
    assert set(row) == set(base) | declared, sorted(set(row) ^ set(base))
    assert all(row[k] == row[k] for k in declared)  # logged and not NaN


@pytest.mark.parametrize("name", NAMES)
def test_variant_exports_what_it_declares(runs, name):
    a = ALIGNMENTS[name]
    files = {p.name for p in (runs / f"run-{name}" / "export" / "vae").iterdir()}
    base = {p.name for p in (runs / "run-none" / "export" / "vae").iterdir()}  # the VAE alone
    assert files == base | set(a.exports)
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(runs / f"run-{name}"))
    head = {k[len("head.") :]: v for k, v in state["model"].items() if k.startswith("head.")}
    assert bool(head) == (a.build_head is not None)
    if "mapper.json" in a.exports:
        cfg = from_dict(TrainVAEConfig, json.loads((runs / f"run-{name}" / "config.json").read_text()))
        mapper = sendvae.load_mapper(runs / f"run-{name}" / "export" / "vae")
        assert set(mapper.state_dict()) == set(head)
        for k, v in mapper.state_dict().items():
            torch.testing.assert_close(v, head[k])
        noisy = a.head_input(cfg) == NOISY_LATENT
        assert mapper.config.noise == noisy  # the exported mapper consumes what the trained one did
    if a.load is not None:  # every exported head reads back as the trained one, its variant recorded
        exported = load_exported_head(runs / f"run-{name}" / "export" / "vae")
        assert exported.alignment is a and not exported.head.training
        assert exported.meta["align"] == name and exported.token_grid == tuple(exported.meta["token_grid"])
        assert set(exported.head.state_dict()) == set(head)
        for k, v in exported.head.state_dict().items():
            torch.testing.assert_close(v, head[k])


@pytest.mark.parametrize("name", NAMES)
def test_trainer_builds_what_the_entry_declares(tmp_path, name):
    a = ALIGNMENTS[name]
    cfg, tr = _trainer(tmp_path, name)
    assert (tr.teacher is not None) == a.needs_teacher and tr.alignment is a
    head = tr.model.head
    assert (head is not None) == (a.build_head is not None)
    if head is None:
        assert a.head_input(cfg) is None and tr.model.token_grid is None
        return
    assert tr.model.token_grid == a.token_grid(head)
    vae = tr.model.vae
    z = torch.randn(2, vae.latent_channels, *vae.latent_grid(cfg.data.resolution))
    head.train()
    same = torch.equal(head(z), head(z))  # a noisy head draws z_t afresh every call
    assert a.head_input(cfg) == (CLEAN_LATENT if same else NOISY_LATENT)


# ---------------------------------------------------------------------------------------------------------
# A new variant plugs in as one entry


def _patch_and_global_cosine(inputs: AlignInputs, cfg: LossConfig):
    """A ReaLS-like loss: token cosine plus the cosine of the pooled prediction with the teacher's global."""
    patch, cos = cosine_alignment_loss(inputs.pred, inputs.target)
    glob, cos_global = cosine_alignment_loss(inputs.pred.mean(1, keepdim=True), inputs.target_global[:, None])
    return patch + glob, {"cos": cos, "cos_global": cos_global}


def test_a_new_variant_is_one_registry_entry(tmp_path, monkeypatch):
    from sendvae.train.export import export_run

    sendvae_entry = ALIGNMENTS["sendvae"]
    # its line in align/names.py, then its entry (in its own module) and its line in the registry
    monkeypatch.setitem(VARIANTS, "toy-global", VariantInfo("toy-global", "patch + global cosine", 1.0, "-"))
    toy = dataclasses.replace(
        sendvae_entry,
        name="toy-global",
        loss=_patch_and_global_cosine,
        logged=("align", "cos", "cos_global"),
        export=None,
        exports=(),
    )
    monkeypatch.setitem(ALIGNMENTS, "toy-global", toy)
    _, base = _trainer(tmp_path / "base", "none")
    base_keys = set(base.train_step(_batch(base)))
    cfg, _ = _trainer(tmp_path / "parse", "sendvae")
    cfg.loss.align = "toy-global"  # the option's choices were fixed at import; the trainer asks the registry
    from sendvae.runtime.distributed import DistInfo
    from sendvae.runtime.log import RunLogger
    from sendvae.train.vae import VAETrainer

    tr = VAETrainer(cfg, DistInfo(0, 1, 0, torch.device("cpu")), tmp_path / "run", RunLogger(None, False))
    assert isinstance(tr.alignment, Alignment) and tr.alignment.name == "toy-global"
    terms = tr.train_step(_batch(tr))
    assert set(terms) == base_keys | set(toy.logged)
    assert torch.isfinite(terms["cos_global"]) and -1 <= float(terms["cos_global"]) <= 1
    out = export_run(tr)
    assert not (out / "mapper.json").exists(), "this variant declares no export"


# ---------------------------------------------------------------------------------------------------------
# Nobody else decides on the variant


def _branches_on_the_variant(tree: ast.AST) -> list[int]:
    """Lines that compare `.align` (or a variant name), isinstance-test an alignment head, or match on it."""
    names = {n for n in ALIGNMENTS if n != "none"}  # "none" is a common value of unrelated options
    heads = {"Mapper", "VFProjector", "RealsHead"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            parts = list(ast.walk(node))
            if any(isinstance(p, ast.Attribute) and p.attr == "align" for p in parts) or any(
                isinstance(p, ast.Constant) and p.value in names for p in parts
            ):
                found.append(node.lineno)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "issubclass"):
            kinds = list(ast.walk(node.args[1])) if len(node.args) > 1 else []
            if any(getattr(k, "id", getattr(k, "attr", None)) in heads for k in kinds):
                found.append(node.lineno)
        elif isinstance(node, ast.Match):
            if any(isinstance(p, ast.Attribute) and p.attr == "align" for p in ast.walk(node.subject)):
                found.append(node.lineno)
    return found


def test_the_branch_finder_finds_branches():
    src = "if cfg.loss.align == 'vf': pass\nif isinstance(head, Mapper): pass\nif kind in ('repa',): pass\n"
    assert _branches_on_the_variant(ast.parse(src)) == [1, 2, 3]


def test_no_module_outside_the_registry_branches_on_the_variant():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if ALIGN in path.parents:
            continue
        for line in _branches_on_the_variant(ast.parse(path.read_text(), str(path))):
            offenders.append(f"{path.relative_to(PACKAGE)}:{line}")
    assert not offenders, f"ask the alignment entry (align/) instead: {offenders}"


# Files where a variant's name appears as a string meaning something else, each with what it means there.
OTHER_MEANINGS = {
    "cli.py": "sendvae",  # the program's name
    "commands/info.py": "sendvae",  # the package's version line
    "runtime/log.py": "sendvae",  # the package's logger
    "evaluation/judge.py": "sendvae",  # the cache folder ~/.cache/sendvae
    "models/sit.py": "repa",  # the SiT time convention of the REPA code (t = 1 noise), not the variant
    "models/sit_io.py": "repa",  # the same convention, inferred from a checkpoint
}
PRESETS_MODULE = "train/vae_config.py"  # the presets name their variant


def test_variant_names_live_in_align_and_the_presets():
    """Outside align/ and the presets a variant is never named in code: configs, the demo and the study read
    align.names; the name is only in user-facing text (docstrings, help, messages), never a constant."""
    names = {n for n in ALIGNMENTS if n != "none"}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if ALIGN in path.parents or rel == PRESETS_MODULE:
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            named = isinstance(node, ast.Constant) and node.value in names
            if named and OTHER_MEANINGS.get(rel) != node.value:
                found.append(f"{rel}:{node.lineno} {node.value!r}")
    assert not found, f"read the variant from align.names instead: {found}"
