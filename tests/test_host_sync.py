"""The hot loop makes no host synchronisation between log steps.

A host sync (reading a device value on the CPU: ``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``,
``bool(t)``, ``float(t)``, ``int(t)``) stalls the CPU until the GPU has caught up, so the next step's kernels
cannot be queued behind the running ones. The trainers keep every logged value a device tensor until the log
step (train/loop.py, `MetricSums`), and decide a skipped step on the device (train/common.py). `HostSyncs`
records such calls at two levels: the Python methods (a TorchFunctionMode) and the ATen ops a read lowers to
(a TorchDispatchMode: ``_local_scalar_dense`` behind item / bool / float, and the ops whose output shape
depends on values: ``nonzero``, ``masked_select``, indexing with a boolean mask), so a read hidden inside a
torch function (``_foreach_lerp_`` given a tensor weight reads it as a number) is found too. On CPU every
tensor is on the "device", so the recorder is entered only around the per-step code (``train_step`` and the
loop's ``MetricSums.add``), not around the data loader, whose CPU tensors are the host's own.
"""

from __future__ import annotations

import contextlib
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from sendvae.cli import main
from sendvae.train.common import MetricSums
from sendvae.train.sit import SiTTrainer
from sendvae.train.vae import VAETrainer

from .conftest import tiny_train_args
from .test_train_sit import _args as sit_args
from .test_train_sit import _store

READS = frozenset({"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"})
VALUE_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2")
MASK_OPS = ("index", "index_put", "index_put_")  # with a boolean mask: a nonzero inside


def _value_dependent(func, args) -> bool:
    name = func.overloadpacket.__name__
    if name in VALUE_OPS:
        return True
    if name in MASK_OPS and len(args) > 1:
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    return False


class _Methods(TorchFunctionMode):
    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS:
            self.log.append(f"Tensor.{name} at\n{''.join(traceback.format_stack(limit=8)[:-1])}")
        return func(*args, **(kwargs or {}))


class _Ops(TorchDispatchMode):
    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _value_dependent(func, args):
            stack = "".join(traceback.format_stack(limit=12)[:-1])
            self.log.append(f"aten.{func.overloadpacket.__name__} at\n{stack}")
        return func(*args, **(kwargs or {}))


class HostSyncs:
    """Records host syncs made inside ``with recorder:`` blocks; ``calls`` lists each with its stack."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __enter__(self) -> HostSyncs:
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(_Methods(self.calls))
        self._stack.enter_context(_Ops(self.calls))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def wrap(self, fn):
        """``fn`` with the recorder active while it runs."""

        def recorded(*args, **kwargs):
            with self:
                return fn(*args, **kwargs)

        return recorded


def _record_loop(monkeypatch, trainer_cls) -> HostSyncs:
    rec = HostSyncs()
    monkeypatch.setattr(trainer_cls, "train_step", rec.wrap(trainer_cls.train_step))
    monkeypatch.setattr(MetricSums, "add", rec.wrap(MetricSums.add))
    return rec


def test_recorder_finds_each_kind_of_read():
    t = torch.arange(4.0)
    with HostSyncs() as rec:
        t.sum().item()
        bool(t.sum() > 0)
        float(t[0])
        t.tolist()
        t.cpu()
        t[t > 1]  # a boolean mask: nonzero, a value-dependent shape
        torch._foreach_lerp_([t.clone()], [t], torch.tensor(0.5))  # a tensor read as a number
    kinds = [c.split(" at")[0] for c in rec.calls]
    for kind in ("Tensor.item", "Tensor.__bool__", "Tensor.__float__", "Tensor.tolist", "Tensor.cpu"):
        assert kind in kinds, kinds
    assert kinds.count("aten._local_scalar_dense") >= 4  # item, bool, float and the lerp weight
    assert "aten.index" in kinds
    with HostSyncs() as rec:
        (t * 2).sum().add_(1)
    assert rec.calls == []


@pytest.mark.parametrize(
    "extra",
    [
        # Send-VAE alignment, GAN from step 0 with LeCam and the adaptive weight, VAE EMA, 2 micro-batches
        {
            "loss.gan_start": 0,
            "loss.lecam_weight": 0.1,
            "loss.gan_adaptive": "true",
            "model.ema": "true",
            "optim.grad_accum": 2,
        },  # fmt: skip
        {"loss.align": "vf", "mapper.grid_mismatch": "resample_teacher", "loss.gan_start": 0},
        {"loss.align": "repae", "loss.gan_start": 0},  # the SiT trained beside the VAE: its step and EMA
    ],
    ids=["sendvae-gan-lecam-ema-accum", "vf-adaptive", "repae"],
)
def test_train_vae_step_makes_no_host_sync(tmp_path, monkeypatch, extra):
    rec = _record_loop(monkeypatch, VAETrainer)
    args = tiny_train_args(tmp_path, steps=4, **extra)
    args[args.index("--run.log_every") + 1] = "4"  # one log step, at the end
    assert main(["train-vae", *args]) == 0
    assert rec.calls == [], f"{len(rec.calls)} host sync(s) in the step:\n" + "\n".join(rec.calls[:3])


def test_train_sit_step_makes_no_host_sync(tmp_path, monkeypatch):
    store = _store(tmp_path / "store", True)  # REPA on cached teacher tokens
    rec = _record_loop(monkeypatch, SiTTrainer)
    args = sit_args(tmp_path, store, steps=4, **{"run.log_every": 4, "optim.grad_accum": 2})
    assert main(["train-sit", *args]) == 0
    assert rec.calls == [], f"{len(rec.calls)} host sync(s) in the step:\n" + "\n".join(rec.calls[:3])
