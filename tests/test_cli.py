"""The command line: help, info, and the README / CI agreement."""

import re
from pathlib import Path

from sendvae.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


def test_readme_commands_match_ci():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    install_run, install_test = blocks[0].strip(), blocks[1].strip()
    # the main job: the embedded real dataset (Debian package), then the whole pipeline
    apt = "$(command -v sudo) sh -c 'apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist'"
    assert install_run == f"{apt}; pip install -e . && sendvae demo"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "apt-get install -y -qq dataset-fashion-mnist" in ci  # the real-data tests run in CI
    ci = (ROOT / ".ci" / "run").read_text()
    assert install_test in ci.splitlines(), "the CI must run the README's test command verbatim"


def test_help_lists_commands(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_every_command_has_help(capsys):
    import importlib

    for name, (module, _) in COMMANDS.items():
        mod = importlib.import_module(f"sendvae.commands.{module}")
        assert mod.NAME == name and mod.HELP
        try:
            main([name, "--help"])
        except SystemExit as e:
            assert e.code == 0
        assert "usage: sendvae" in capsys.readouterr().out


def test_info_lists_presets_and_teachers(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("torch", "f8d4", "f16d32", "shapes-tiny", "dinov2-vit-b", "efficientnet-lite0"):
        assert word in out, word
