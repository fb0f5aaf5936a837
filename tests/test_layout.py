"""The layout: the library never imports the command line, files stay small, and the Python API alone
caches latents, samples a SiT into an .npz and probes, without a command module."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

PKG = Path(__file__).resolve().parents[1] / "src" / "sendvae"
MAX_LINES = 450


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved; import_module("...")
    calls with a literal name included)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # `from .. import cli` imports sendvae.cli
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
            "import_module",
            "__import__",
        ):
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                out.add(node.args[0].value)
    return out


def _is_cli(module: str) -> bool:
    return module in ("sendvae.cli", "sendvae.commands") or module.startswith(
        ("sendvae.cli.", "sendvae.commands.")
    )


def test_resolver_sees_relative_imports(tmp_path):
    # the check below could only pass vacuously if relative imports were missed: cli.py's own are seen
    assert "sendvae.runtime.log" in imported_modules(PKG / "cli.py")
    assert "sendvae.commands._training" in imported_modules(PKG / "commands" / "train_vae.py")


def test_library_never_imports_commands_or_cli():
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        if rel == Path("cli.py"):
            continue
        in_commands = rel.parts[0] == "commands"
        for mod in sorted(imported_modules(path)):
            if (mod == "sendvae.cli" or mod.startswith("sendvae.cli.")) or (not in_commands and _is_cli(mod)):
                offenders.append(f"{rel}: {mod}")
    assert not offenders, "library modules import the command line:\n" + "\n".join(offenders)


def test_no_command_module_has_its_own_entry_point():
    for path in sorted((PKG / "commands").glob("*.py")):
        tree = ast.parse(path.read_text())
        names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert "main" not in names, f"{path.name}: the entry point is sendvae.cli"
        assert '__name__ == "__main__"' not in path.read_text(), path.name


def test_no_source_file_over_the_limit():
    long = {
        str(p.relative_to(PKG)): n
        for p in PKG.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"files over {MAX_LINES} lines (split them): {long}"


# -- the Python API end to end, on the embedded data -------------------------------------------------------


def _cli_modules() -> list[str]:
    return [m for m in sys.modules if _is_cli(m)]


@pytest.mark.slow
def test_python_api_caches_samples_and_probes_without_a_command(tmp_path, monkeypatch):
    for name in _cli_modules():  # imported by other tests of this session; put back afterwards
        monkeypatch.delitem(sys.modules, name)

    from sendvae.analysis.report import probe_models
    from sendvae.data import DataConfig
    from sendvae.data.caching import cache_latents
    from sendvae.diffusion.generate import generate, make_labels
    from sendvae.diffusion.sampling import SamplerConfig
    from sendvae.models.sit import SiT, SiTConfig
    from sendvae.models.vae_io import load_vae

    torch.manual_seed(0)
    vae = load_vae("tiny-f4d4")
    data = DataConfig(name="shapes", resolution=32, shapes_length=60)
    store = cache_latents(vae, data, tmp_path / "store", batch_size=16, device="cpu", progress=False)
    assert len(store) == 60 and store.latent_shape == (4, 8, 8)
    store.check_vae(vae)

    mcfg = SiTConfig(
        input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2,
        num_classes=store.num_classes, z_dims=(), encoder_depth=1,
    )  # fmt: skip
    SiT(mcfg).save_pretrained(tmp_path / "sit")
    # an export without latents.json: the statistics must be given; the store's name the VAE used
    with pytest.raises(ValueError, match="does not record the latent statistics"):
        generate(tmp_path / "sit", 6, SamplerConfig(steps=2), tmp_path / "none", vae=vae, device="cpu")
    npz = generate(
        tmp_path / "sit", 6, SamplerConfig(steps=2), tmp_path / "samples", vae=vae, latent_stats=store.stats,
        batch_size=4, seed=3, device="cpu", progress=False,
    )  # fmt: skip
    with np.load(npz) as z:
        images, labels = z["arr_0"], z["arr_1"]
    assert npz.suffix == ".npz" and images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
    assert labels.tolist() == make_labels(6, store.num_classes, 3, "random").tolist()

    report = probe_models(
        tmp_path / "probe", vaes=[("vae", vae)], latents=[f"store={store.root}"], num_images=60,
        teacher=None, device="cpu", progress=False,
    )  # fmt: skip
    res = report["results"]
    assert list(res) == ["vae", "store"] and (tmp_path / "probe" / "probe.md").exists()
    assert res["vae"]["feature_dim"] == res["store"]["feature_dim"] == 4 * 8 * 8
    # the store holds this VAE's posterior means of the same images: the same class probe
    assert res["store"]["summary"]["class_accuracy"] == pytest.approx(res["vae"]["summary"]["class_accuracy"])

    assert _cli_modules() == []


def test_readme_layout_matches_the_tree():
    """Every package and every library module is named in the README's Layout section, and nothing else."""
    import re

    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text()
    layout = text[text.index("## Layout") :]
    layout = layout[: layout.index("```", layout.index("```") + 3)]
    pkg = root / "src" / "sendvae"
    listed = set(re.findall(r"^  (\w+)/", layout, flags=re.M))
    dirs = {d.name for d in pkg.iterdir() if d.is_dir() and (d / "__init__.py").exists()}
    assert dirs <= listed | {"bench"} and listed - {"bench"} <= dirs, (dirs, listed)
    words = set(re.findall(r"[A-Za-z_]+", layout))
    for d in dirs - {"commands", "bench"}:
        for f in (pkg / d).glob("*.py"):
            if f.stem != "__init__":
                assert f.stem in words, f"{d}/{f.name} is not in the README's Layout section"
