import os

import pytest
import torch

# Two cores on CI: keep each test process to one intra-op thread unless a test asks for more.
torch.set_num_threads(int(os.environ.get("SENDVAE_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _private_torch_home(tmp_path_factory, monkeypatch):
    """Tests never read or fill the user's torch hub cache (e.g. FID Inception weights found there), nor
    the user's judge cache (one cache shared by the tests of a session: a judge recipe trains once)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.getbasetemp() / "torch-home"))
    monkeypatch.setenv("SENDVAE_CACHE", str(tmp_path_factory.getbasetemp() / "sendvae-cache"))


def tiny_train_args(out_dir, exp="run", steps=6, **overrides):
    """CLI arguments for a seconds-long train-vae run on 32 px shapes with the embedded teacher."""
    args = [
        "--preset",
        "shapes-tiny",
        "--output-dir",
        str(out_dir),
        "--exp-name",
        exp,
        "--resolution",
        "32",
        "--batch-size",
        "4",
        "--max-steps",
        str(steps),
        "--data.num_workers",
        "0",
        "--run.log_every",
        "1",
        "--run.ckpt_every",
        "0",
        "--run.sample_every",
        "0",
        "--run.stats_images",
        "8",
        "--loss.gan_start",
        "2",
    ]
    for k, v in overrides.items():
        args += [f"--{k}", str(v)]
    return args


@pytest.fixture
def tiny_args():
    return tiny_train_args


def assert_ddp_matches_single(
    command: str, args_one: list[str], args_two: list[str], run_one, run_two, steps: int
) -> None:
    """Run ``sendvae <command>`` in 1 process and under torchrun with 2; the logged losses must agree."""
    import os
    import shutil
    import subprocess
    import sys

    from sendvae.runtime.log import read_stats

    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for launcher, args in (
        ([sys.executable], args_one),
        ([torchrun, "--standalone", "--nproc_per_node", "2"], args_two),
    ):
        r = subprocess.run(
            [*launcher, "-m", "sendvae.cli", command, *args], env=env, capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = read_stats(run_one / "stats.jsonl"), read_stats(run_two / "stats.jsonl")
    assert len(a) == len(b) == steps
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) < 1e-5 * max(1.0, abs(ra["loss"])), (ra, rb)
