"""The TorchScript-as-data reader on crafted archives: every one a WeightsError, no pickle op ever touches
a tensor or a storage, and no entry is inflated before its declared size is checked."""

from __future__ import annotations

import collections
import io
import pickle
import tracemalloc
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from sendvae.runtime.weights import WeightsError, read_torchscript_tensors, read_weights


class Storage:
    def __init__(self, key: str, numel: int, stype: Any = torch.FloatStorage) -> None:
        self.key, self.numel, self.stype = key, numel, stype


class Tensor:
    """A tensor as TorchScript pickles one: _rebuild_tensor_v2(storage, offset, size, stride, ...), with
    optional pickle state (BUILD) or items (SETITEMS) applied to the result."""

    def __init__(self, storage, offset=0, size=(4,), stride=(1,), state=None, items=None) -> None:
        self.args = (storage, offset, size, stride)
        self.state, self.items = state, items

    def __reduce__(self):
        args = (*self.args, False, collections.OrderedDict())
        return torch._utils._rebuild_tensor_v2, args, self.state, None, self.items


class Record:
    """A scripted module: __torch__.<name> with an attribute dict."""

    def __init__(self, state: dict) -> None:
        self.state = state

    def __reduce__(self):
        return _ScriptClass, (), self.state


class _ScriptClass:
    """Pickled as the global ``__torch__.model.Model``, a scripted class (not importable here)."""


class Deep:
    def __init__(self, inner: Any, n: int) -> None:
        self.inner, self.n = inner, n


class _Pickler(pickle._Pickler):  # the Python pickler: its save_global can name a class that does not exist
    def save_global(self, obj, name=None):
        if obj is _ScriptClass:
            self.write(pickle.GLOBAL + b"__torch__.model\nModel\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)

    def save_deep(self, obj):  # n nested lists around one object, without recursion
        self.write(pickle.EMPTY_LIST * obj.n)
        self.save(obj.inner)
        self.write(pickle.APPEND * obj.n)

    dispatch = {**pickle._Pickler.dispatch}

    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", obj.stype, obj.key, "cpu", obj.numel)
        return None


def archive(path: Path, root: Any, storages: dict[str, bytes], deflate: bool = False) -> Path:
    """A TorchScript-shaped zip: archive/data.pkl, archive/constants.pkl, archive/data/<key>."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(root)
    method = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", compression=method) as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        zf.writestr("archive/constants.pkl", pickle.dumps(()))
        for key, data in storages.items():
            zf.writestr(f"archive/data/{key}", data)
    return path


FOUR = torch.arange(4.0).numpy().tobytes()


def test_a_well_formed_crafted_archive_reads(tmp_path):
    s = Storage("0", 4)
    path = archive(
        tmp_path / "ok.pt", Record({"weight": Tensor(s), "half": Tensor(s, 2, (2,), (1,))}), {"0": FOUR}
    )
    out = read_torchscript_tensors(path)
    assert out["weight"].tolist() == [0, 1, 2, 3] and out["half"].tolist() == [2, 3]


@pytest.mark.parametrize(
    "tensor, storages",
    [
        (Tensor(Storage("0", 4), size=(100,)), {"0": FOUR}),  # past the end of its storage
        (Tensor(Storage("0", 4), offset=-1), {"0": FOUR}),  # negative offset
        (Tensor(Storage("0", 4), offset=3, size=(2, 2), stride=(2, 1)), {"0": FOUR}),
        (Tensor(Storage("0", 4), size="12", stride="11"), {"0": FOUR}),  # string sizes
        (Tensor(Storage("0", 4), size=(4,), stride=(1, 1)), {"0": FOUR}),
        (Tensor(Storage("0", 4), offset="1"), {"0": FOUR}),
        (Tensor(Storage("0", 8)), {"0": FOUR}),  # the storage claims more than its entry holds
        (Tensor(Storage("1", 4)), {"0": FOUR}),  # no such entry
        (Tensor(Storage("0", -4)), {"0": FOUR}),
        (Tensor(Storage(["0"], 4)), {"0": FOUR}),
        (Tensor("a string for a storage"), {"0": FOUR}),
    ],
)
def test_crafted_tensors_are_weights_errors(tmp_path, tensor, storages):
    path = archive(tmp_path / "bad.pt", Record({"weight": tensor}), storages)
    with pytest.raises(WeightsError) as e:
        read_weights(path, "teacher weights")
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_build_on_a_rebuilt_tensor_never_resizes_its_storage(tmp_path):
    """BUILD (__setstate__) on a tensor set_() it onto its 0-byte storage resized to 4 MiB: uninitialised
    heap memory in the weights."""
    s = Storage("0", 0)
    t = Tensor(s, size=(0,), state=(s, 0, (1 << 20,), (1,)))
    path = archive(tmp_path / "build.pt", Record({"weight": t}), {"0": b""})
    with pytest.raises(WeightsError, match="changes a tensor"):
        read_torchscript_tensors(path)


def test_setitems_on_a_tensor_is_refused(tmp_path):
    t = Tensor(Storage("0", 4), items=iter([(0, 99.0)]))
    path = archive(tmp_path / "setitem.pt", Record({"weight": t}), {"0": FOUR})
    with pytest.raises(WeightsError):
        read_torchscript_tensors(path)


def test_deep_nesting_is_a_weights_error(tmp_path):
    """20000 nested lists: RecursionError in the walk over the records."""
    path = archive(tmp_path / "deep.pt", Record({"x": Deep(Tensor(Storage("0", 4)), 20_000)}), {"0": FOUR})
    with pytest.raises(WeightsError, match="levels deep"):
        read_torchscript_tensors(path)


def test_deflated_storage_is_not_inflated_before_its_size_is_checked(tmp_path):
    """A 131 KB archive with a 128 MiB deflated entry for a 4-element storage cost 257 MB before failing."""
    path = archive(
        tmp_path / "bomb.pt", Record({"w": Tensor(Storage("0", 4))}), {"0": bytes(128 << 20)}, deflate=True
    )
    assert path.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(WeightsError, match="holds 134217728 bytes, its tensors need 16"):
            read_torchscript_tensors(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak


_Pickler.dispatch[Deep] = _Pickler.save_deep
