"""One vocabulary: a concept has one option name in every command; no abbreviations; every default in
``--help``; ``--config RUN/config.json`` reruns a saved config; library errors name the user's options."""

import argparse
import importlib
import io
import json
import re
import tokenize
from pathlib import Path

import pytest

from sendvae.cli import COMMANDS, build_parser, command_parser, main
from sendvae.config import format_value, get_value, iter_fields

SRC = Path(__file__).resolve().parents[1] / "src" / "sendvae"
ALL = set(COMMANDS)

# concept -> (the one spelling, the commands that offer it, spellings no command may use)
CONCEPTS = {
    "output folder": (
        "--output-dir",
        {"train-vae", "train-sit", "cache-latents", "sample", "probe", "downstream", "demo", "study"},
        {"--output", "--out", "--outdir", "--out-dir", "--output-folder", "--results-dir", "--save-dir"},
    ),
    "experiment name": ("--exp-name", {"train-vae", "train-sit"}, {"--name", "--run-name", "--exp"}),
    "VAE": (
        "--vae",
        {"train-vae", "train-sit", "cache-latents", "sample", "evaluate", "probe", "bench", "downstream"},
        {"--vae-path", "--vae-model", "--autoencoder"},
    ),
    "VAE checkpoint": ("--vae-ckpt", {"train-vae", "train-sit"}, {"--vae-checkpoint", "--vae-weights"}),
    "teacher": (
        "--enc-type",
        {"train-vae", "train-sit", "cache-latents", "evaluate", "probe", "bench", "downstream"},
        {"--teacher", "--feature-teacher", "--teacher-name", "--encoder", "--enc"},
    ),
    "teacher weights": (
        "--teacher-weights",
        {"train-vae", "cache-latents", "evaluate", "probe", "downstream"},
        {"--enc-weights", "--encoder-weights", "--teacher-ckpt", "--teacher-path"},
    ),
    "data path": (
        "--data-path",
        {"train-vae", "cache-latents", "evaluate", "probe", "demo"},
        {"--data-root", "--data-dir", "--dataset-path", "--data-folder"},
    ),
    "seed": (
        "--seed",
        {
            "train-vae",
            "train-sit",
            "cache-latents",
            "sample",
            "evaluate",
            "probe",
            "prepare",
            "downstream",
            "demo",
        },
        {"--global-seed", "--random-seed"},
    ),
    "device": (
        "--device",
        {
            "train-vae",
            "train-sit",
            "cache-latents",
            "sample",
            "evaluate",
            "probe",
            "bench",
            "downstream",
            "demo",
            "study",
        },
        {"--gpu", "--dev", "--accelerator"},
    ),
    # beyond the reference scripts' names
    "dataset kind": ("--data", {"train-vae", "prepare", "cache-latents", "evaluate", "probe"}, {"--source"}),
    "batch size": (
        "--batch-size",
        {"train-vae", "train-sit", "cache-latents", "sample", "evaluate", "probe", "bench", "downstream"},
        {"--batch", "--bs"},
    ),
    "latent store": ("--store", {"train-sit", "probe"}, {"--latents", "--latent-store"}),
}

# A word in an option name -> every option of any command whose name holds it (other concepts included):
# a new option that spells a known concept another way fails here.
WORDS = {
    "out": {"--output-dir", "--output-json"},
    "exp": {"--exp-name", "--exp-path"},
    "vae": {"--vae", "--vae-ckpt", "--vae-config"},
    "teacher": {"--teacher-weights", "--teacher-random-init", "--teacher-features"},
    "enc": {"--enc-type", "--encoder-depth"},
    "data": {"--data", "--data-path"},
    "root": set(),
    "seed": {"--seed", "--seeds"},  # --seeds: the study's list of run seeds
    "device": {"--device"},
    "batch": {"--batch-size"},
}


def _module(name: str):
    return importlib.import_module(f"sendvae.commands.{COMMANDS[name][0]}")


def _parser(name: str) -> argparse.ArgumentParser:
    return command_parser(_module(name))  # the command module's add_arguments, as `sendvae NAME` builds it


def _options(p: argparse.ArgumentParser) -> set[str]:
    """Long options, without the ``--section.field`` config keys."""
    return {s for a in p._actions for s in a.option_strings if s.startswith("--") and "." not in s}


PARSERS = {name: _parser(name) for name in COMMANDS}


@pytest.mark.parametrize("concept", sorted(CONCEPTS))
def test_one_spelling_per_concept(concept):
    spelling, offering, others = CONCEPTS[concept]
    for name, p in PARSERS.items():
        opts = _options(p)
        assert not opts & others, (
            f"sendvae {name} spells the {concept} {sorted(opts & others)}, not {spelling}"
        )
        assert (spelling in opts) == (name in offering), (name, concept, spelling)


def test_words_in_option_names_belong_to_one_concept():
    every = set().union(*(_options(p) for p in PARSERS.values()))
    for word, allowed in WORDS.items():
        found = {o for o in every if word in o[2:]}
        assert found <= allowed, (
            f"options with {word!r}: {sorted(found - allowed)} (known: {sorted(allowed)})"
        )


@pytest.mark.parametrize("name", ["train-vae", "train-sit"])
def test_training_spellings_set_their_config_keys(name, capsys):
    flags = {
        "--output-dir": ("run.output_dir", "out"),
        "--exp-name": ("run.exp_name", "e1"),
        "--seed": ("run.seed", 7),
        "--device": ("run.device", "cpu"),
        "--vae-ckpt": ("model.vae_ckpt" if name == "train-vae" else "model.vae", "v.pt"),
        "--batch-size": ("optim.batch_size", 4),
    }
    if name == "train-vae":
        flags.update({
            "--vae": ("model.vae", "tiny-f4d4"), "--enc-type": ("teacher.enc_type", "dinov2-vit-s"),
            "--teacher-weights": ("teacher.weights", "t.pth"), "--data-path": ("data.path", "d"),
            "--data": ("data.name", "imagefolder"),
        })  # fmt: skip
    else:
        flags.update({"--store": ("data.store", "s"), "--proj-coeff": ("transport.proj_coeff", 0.25)})
    argv = [s for flag, (_, value) in flags.items() for s in (flag, str(value))]
    assert main([name, "--preset", "shapes-tiny", *argv, "--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    for flag, (key, value) in flags.items():
        a, b = key.split(".")
        assert cfg[a][b] == value, flag


@pytest.mark.parametrize("flag", ["--model", "--models"])
def test_sit_model_spellings(flag, capsys):
    assert main(["train-sit", "--preset", "shapes-tiny", flag, "SiT-XL/2", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["model"] == "SiT-XL/2"  # the preset's is SiT-S/2


@pytest.mark.parametrize(
    "argv",
    [
        ["train-vae", "--loss.kl", "1e-3", "--dry-run"],
        ["train-vae", "--loss.kl=1e-3", "--dry-run"],
        ["train-vae", "--out", "x", "--dry-run"],
        ["train-sit", "--mod", "SiT-B/2", "--dry-run"],
        ["train-sit", "--output", "x", "--dry-run"],
        ["cache-latents", "--vae", "tiny-f4d4", "--output-dir", "y", "--out", "x"],
        ["sample", "--model", "m", "--out", "x"],
        ["evaluate", "--recon", "--vae", "tiny-f4d4", "--out", "m.json"],
        ["probe", "--pixels", "--out", "x"],
        ["bench", "vae", "--batch", "2"],
        ["prepare", "a", "b", "--res", "64"],
    ],
)
def test_abbreviations_are_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_no_parser_abbreviates(capsys):
    top = build_parser()
    assert top.allow_abbrev is False
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    assert all(p.allow_abbrev is False for p in sub.choices.values())
    assert all(p.allow_abbrev is False for p in PARSERS.values())
    for argv in (["--vers"], ["train-v", "--dry-run"]):  # no abbreviated option or command either
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    # the full name still works
    assert main(["train-vae", "--loss.kl_weight", "1e-3", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"]["kl_weight"] == 1e-3


@pytest.mark.parametrize("name", ["train-vae", "train-sit"])
def test_every_config_option_shows_its_default_and_choices(name):
    mod = _module(name)
    cfg_mod = importlib.import_module(f"sendvae.train.{name.split('-')[1]}_config")
    base = cfg_mod.PRESETS.build(mod.DEFAULT_PRESET)
    p = PARSERS[name]
    helps = {a.option_strings[0]: a.help for a in p._actions if a.option_strings}
    text = " ".join(p.format_help().split())  # formats (every % escaped)
    shown = 0
    for dotted, f, _ in iter_fields(type(base)):
        if dotted == "preset" or f.metadata.get("hidden"):
            continue
        h = helps[f"--{dotted}"]
        assert "(default" in h, dotted
        if "(default:" not in f.metadata["help"]:  # a field that words its own default keeps it
            assert f"default: {format_value(get_value(base, dotted))}".replace("%", "%%") in h, dotted
            shown += 1
        for c in f.metadata.get("choices") or ():
            assert str(c) in h, (dotted, c)
        assert f"--{dotted}" in text
    assert shown > 40
    if name == "train-sit":
        assert "default: SiT-XL/2; choices: SiT-S/1" in helps["--model.model"]
    else:
        assert "default: 8" in helps["--optim.batch_size"]  # the shapes-tiny preset's, not the class's 1024


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_shows_its_default(name):
    p = PARSERS[name]
    fmt = p._get_formatter()
    for a in p._actions:
        assert a.help, (name, a.option_strings or a.dest)  # argparse prints no default without a help text
        d = a.default
        if not a.option_strings or a.help == argparse.SUPPRESS or d in (None, False, [], argparse.SUPPRESS):
            continue
        assert "default" in fmt._get_help_string(a), (name, a.option_strings)


def _dry_run(capsys, argv) -> dict:
    assert main([*argv, "--dry-run"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    "name, argv",
    [
        ("train-vae", ["--preset", "shapes-tiny", "--max-steps", "7", "--loss.kl_weight", "1e-3",
                       "--exp-name", "e"]),
        (
            "train-sit",
            ["--preset", "sit-b2-repa", "--models", "SiT-S/2", "--store", "lat", "--latents.mean", "0.1,-0.2",
             "--latents.std", "1.5,2", "--optim.betas", "0.9,0.95"],
        ),
    ],
)  # fmt: skip
def test_config_reruns_a_saved_config(name, argv, tmp_path, capsys):
    saved = _dry_run(capsys, [name, *argv])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(saved, indent=2))
    assert _dry_run(capsys, [name, "--config", str(run / "config.json")]) == saved
    assert _dry_run(capsys, [name, "--config", str(run)]) == saved  # the run folder names it too
    # the other options apply on top, short spellings and dotted keys alike
    on_top = ["--seed", "5", "--run.log_every", "3"]
    again = _dry_run(capsys, [name, "--config", str(run / "config.json"), *on_top])
    assert (again["run"]["seed"], again["run"]["log_every"]) == (5, 3)
    again["run"].update(seed=saved["run"]["seed"], log_every=saved["run"]["log_every"])
    assert again == saved
    # one starting point: a preset or a saved config
    with pytest.raises(SystemExit):
        main([name, "--config", str(run), "--preset", "shapes-tiny", "--dry-run"])
    capsys.readouterr()
    assert main([name, "--config", str(tmp_path / "none.json"), "--dry-run"]) == 2
    assert "--config" in capsys.readouterr().err
    other = "train-sit" if name == "train-vae" else "train-vae"
    assert main([other, "--config", str(run), "--dry-run"]) == 2  # another command's config is refused
    assert "unknown" in capsys.readouterr().err


def test_config_reruns_a_real_run(tmp_path, tiny_args, capsys):
    """The config.json a run writes, rerun with --config, is the same config."""
    assert main(["train-vae", *tiny_args(tmp_path, steps=1)]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    capsys.readouterr()
    assert _dry_run(capsys, ["train-vae", "--config", str(tmp_path / "run" / "config.json")]) == saved


def test_value_errors_name_the_flag_typed(capsys):
    assert main(["train-sit", "--models", "SiT-Q/2", "--dry-run"]) == 2
    assert "--models: 'SiT-Q/2' is not one of" in capsys.readouterr().err
    assert main(["train-vae", "--batch-size", "x", "--dry-run"]) == 2
    assert "--batch-size:" in capsys.readouterr().err


def test_library_errors_name_the_commands_option(tmp_path, capsys):
    argv = ["evaluate", "--make-ref", str(tmp_path / "r.npz"), "--data", "prepared", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--data-path" in err and "--data.path" not in err


def _flags_in_library_strings() -> dict[str, set[str]]:
    """Every ``--flag`` that a string in the library (not the command modules) names -> its files."""
    found: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        if path.parent.name == "commands" or path.name == "cli.py":
            continue
        for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            if tok.type == tokenize.STRING or tok.type == getattr(tokenize, "FSTRING_MIDDLE", -1):
                for m in re.finditer(r"(?<![\w-])--([a-z][a-z0-9_.*-]*[a-z0-9_*])", tok.string):
                    found.setdefault(m.group(1), set()).add(str(path.relative_to(SRC)))
    return found


def test_flags_named_in_library_strings_exist():
    """A message or docstring in the library names only options some command has (no stale spellings)."""
    options = {s[2:] for p in PARSERS.values() for a in p._actions for s in a.option_strings}
    known = {"nproc_per_node", "section.field"}  # torchrun's; the placeholder of every config key
    stale = []
    for flag, files in _flags_in_library_strings().items():
        pattern = re.compile(re.escape(flag).replace(r"\*", r"[a-z_]+") + "$")
        if flag not in options | known and not any(pattern.match(o) for o in options):
            stale.append(f"--{flag} (in {', '.join(sorted(files))})")
    assert not stale, f"no command has these options: {stale}"
