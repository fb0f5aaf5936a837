import os

import pytest
import torch

from sendvae.data.sampler import StepBatchSampler
from sendvae.runtime import checkpoint as ckpt
from sendvae.runtime.log import RunLogger, read_stats


def test_atomic_save_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "state.pt"
    ckpt.atomic_torch_save({"a": torch.ones(2)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        ckpt.atomic_torch_save({"a": Boom()}, path)
    assert torch.equal(ckpt.load_checkpoint(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"], "temp files must be cleaned up"


def test_checkpoint_rotation_and_latest(tmp_path):
    for step in (10, 20, 30):
        ckpt.save_training_state(tmp_path, step, {"step": step}, keep=2)
    steps = [s for s, _ in ckpt.list_checkpoints(tmp_path)]
    assert steps == [20, 30]
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))["step"] == 30


def test_step_seed_is_a_function_of_seed_step_rank():
    from sendvae.train.common import step_seed

    seeds = {step_seed(s, t, r) for s in range(3) for t in range(50) for r in range(4)}
    assert len(seeds) == 3 * 50 * 4  # distinct streams
    assert step_seed(1, 2, 3) == step_seed(1, 2, 3) and 0 <= step_seed(1, 2, 3) < 2**63


def test_sampler_is_a_function_of_step_and_splits_across_ranks():
    one = StepBatchSampler(10, 4, seed=5)
    ranks = [StepBatchSampler(10, 4, rank=r, world_size=2, seed=5) for r in range(2)]
    for step in range(7):  # crosses epoch boundaries (10 is not a multiple of 4)
        g = one.batch(step)
        assert sorted(g) == sorted(ranks[0].batch(step) + ranks[1].batch(step))
    # each epoch is a permutation of the dataset
    first = [i for s in range(5) for i in one.batch(s)][:10]
    assert sorted(first) == list(range(10))
    # resuming at step k yields the same batches as running from 0
    resumed = StepBatchSampler(10, 4, seed=5, start_step=3, max_steps=6)
    assert list(resumed) == [one.batch(s) for s in (3, 4, 5)]
    with pytest.raises(ValueError, match="divisible"):
        StepBatchSampler(10, 5, world_size=2)


def test_run_logger_writes_stats(tmp_path):
    log = RunLogger(tmp_path, is_main=True, stream=open(os.devnull, "w"))
    log.stats(1, {"loss": torch.tensor(0.5), "lr": 1e-3}, echo=False)
    log.info("hello")
    log.close()
    rows = read_stats(tmp_path / "stats.jsonl")
    assert rows == [{"step": 1, "loss": 0.5, "lr": 1e-3}]
    assert "hello" in (tmp_path / "log.txt").read_text()
    with open(tmp_path / "stats.jsonl", "a") as f:
        f.write('{"step": 2, "lo')  # a torn line from a killed run
    assert len(read_stats(tmp_path / "stats.jsonl")) == 1


def test_atomic_files_get_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        ckpt.atomic_write_json({"a": 1}, tmp_path / "x.json")
        ckpt.atomic_save_safetensors({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    for name in ("x.json", "w.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644


def test_library_log_lines_reach_the_run_log(tmp_path, capsys):
    import logging

    from sendvae.runtime.log import RunLogger, configure_logging

    configure_logging()
    log = RunLogger(tmp_path)
    logging.getLogger("sendvae.teachers.base").info("ignored 3 keys")
    log.close()
    logging.getLogger("sendvae.teachers.base").info("after close")
    text = (tmp_path / "log.txt").read_text()
    assert "ignored 3 keys" in text and "after close" not in text
    assert "ignored 3 keys" in capsys.readouterr().out
