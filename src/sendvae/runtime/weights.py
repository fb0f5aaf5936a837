"""Reading weight files as data: the one reader every loader goes through.

Weights come from the internet; a loader that runs code from them hands the machine to whoever made the
file. So every ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt`` / ``.safetensors`` that sendvae reads (teachers,
VAEs, discriminators, SiTs, LPIPS, the FID Inception, training states) goes through ``read_weights``:

* ``.safetensors``: safetensors' own reader (it holds only tensors).
* TorchScript archives (OpenAI's CLIP ``.pt``): never ``torch.jit.load``, which runs the archive's code
  (a ``__setstate__`` can write any file). Their tensors are ordinary records in the zip; ``data.pkl``
  is read by a restricted unpickler (`_ScriptUnpickler`) that knows only tensor rebuilding and turns every
  scripted class into an inert attribute record. Nothing from the archive's ``code/`` folder is read.
* everything else: ``torch.load(weights_only=True)``; a full unpickle only with ``trust_pickle=True``.

Any failure is a `WeightsError` (a ValueError, so the CLI prints it as one line) naming the file, what it
was read as, and what to do. torch and safetensors have no such reader for TorchScript archives, hence
this module.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".tar", ".ckpt")


class WeightsError(ValueError):
    """A weights file is missing, corrupt, or holds something other than tensors."""


def read_weights(
    path: str | os.PathLike, what: str = "weights", *, trust_pickle: bool = False, map_location: Any = "cpu"
) -> Any:
    """The contents of a weights file (usually a dict of tensors), read without running code from it.

    ``what`` names the file's role in errors ("teacher weights", "--vae-ckpt", ...). ``trust_pickle``
    allows a full unpickle of a torch.save file (which can run code): only for files the user trusts.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise WeightsError(f"{what} '{path}' does not exist: check the path")
    if path.is_dir():
        raise WeightsError(f"{what} '{path}' is a folder: name the weights file inside it")
    if path.suffix == ".safetensors":
        return _read_safetensors(path, what, map_location)
    if is_torchscript(path):
        tensors = read_torchscript_tensors(path, what)
        return {k: v.to(map_location) for k, v in tensors.items()}
    try:
        return torch.load(path, map_location=map_location, weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:  # the weights-only unpickler met a Python object
        first = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
        raise WeightsError(
            f"{what} '{path}' holds Python objects besides tensors ({first}); sendvae reads weights only "
            "as data. Re-save just its tensors (torch.save(state_dict, new_file)) or convert it to "
            "safetensors; if you trust the file's source, opt in to a full unpickle (trust_pickle=True)"
        ) from None
    except Exception as e:  # EOFError, RuntimeError (zip reader), KeyError (torn pickle memo), ...
        raise WeightsError(
            f"{what} '{path}' is not a readable torch file ({_short(e)}): it is probably truncated or "
            "corrupt, download or copy it again"
        ) from None


def _read_safetensors(path: Path, what: str, map_location: Any) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(map_location))
    except Exception as e:  # SafetensorError (a bare Exception subclass), OSError, ...
        raise WeightsError(
            f"{what} '{path}' is not a readable safetensors file ({_short(e)}): it is probably "
            "truncated or corrupt, download or copy it again"
        ) from None


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:160] + ("..." if len(text) > 160 else "")


# ---------------------------------------------------------------------------------------------------------
# TorchScript archives, as data


def is_torchscript(path: Path) -> bool:
    """A torch zip archive with a ``code/`` folder or ``constants.pkl``: a TorchScript module."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _ScriptRecord:
    """Stands in for a scripted class: keeps whatever state the archive gives it, runs nothing."""

    def __init__(self, *args: Any) -> None:
        self.state: Any = args or None

    def __setstate__(self, state: Any) -> None:  # pickle's BUILD; never the archive's own __setstate__
        self.state = state


class _StorageType:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """torch._utils._rebuild_tensor_v2 on a flat tensor standing for the storage."""
    return torch.as_strided(storage, tuple(size), tuple(stride), int(offset))


def _build_ordered_dict(*args: Any) -> dict:
    return dict(*args)


class _ScriptUnpickler(pickle.Unpickler):
    """data.pkl of a TorchScript archive: tensors and plain containers; scripted classes become records."""

    def __init__(self, zf: zipfile.ZipFile, prefix: str, file, what: str, path: Path) -> None:
        super().__init__(file)
        self.zf, self.prefix, self.what, self.path = zf, prefix, what, path

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptRecord
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "collections" and name == "OrderedDict":
            return _build_ordered_dict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise WeightsError(
            f"{self.what} '{self.path}' is a TorchScript archive with a '{module}.{name}' record, which "
            "sendvae does not read as data: export the model's state_dict to safetensors instead"
        )

    def persistent_load(self, pid: Any) -> torch.Tensor:
        # ('storage', storage type, key, location, numel): the bytes are the zip entry data/<key>
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise WeightsError(f"{self.what} '{self.path}': unexpected record {str(pid)[:80]} in data.pkl")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType):
            raise WeightsError(f"{self.what} '{self.path}': unknown storage type in data.pkl")
        raw = bytearray(self.zf.read(f"{self.prefix}data/{key}"))
        itemsize = torch.empty((), dtype=stype.dtype).element_size()
        if len(raw) != int(numel) * itemsize:
            raise WeightsError(f"{self.what} '{self.path}': storage {key} is truncated")
        if not raw:
            return torch.empty(0, dtype=stype.dtype)
        return torch.frombuffer(raw, dtype=stype.dtype)


def read_torchscript_tensors(path: str | Path, what: str = "weights") -> dict[str, torch.Tensor]:
    """The named tensors of a TorchScript module archive (its state_dict names), without running it.

    A module is pickled as its class (here an inert record) plus an attribute dict: parameters, buffers
    and submodules by name, so walking the records gives the state_dict's dotted names. A class whose
    state is not a dict (a custom ``__getstate__``) gives positional names ``<prefix>.<i>``.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            data = next((n for n in names if n.endswith("data.pkl") and n.count("/") == 1), None)
            if data is None:
                raise WeightsError(f"{what} '{path}' is a TorchScript archive without data.pkl")
            prefix = data[: -len("data.pkl")]
            with zf.open(data) as f:
                root = _ScriptUnpickler(zf, prefix, f, what, path).load()
    except WeightsError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, pickle.UnpicklingError, KeyError) as e:
        raise WeightsError(
            f"{what} '{path}' is a damaged TorchScript archive ({_short(e)}): download or copy it again"
        ) from None
    out: dict[str, torch.Tensor] = {}
    _collect(root, "", out, set())
    return {k: v.clone() for k, v in out.items()}  # own memory, detached from the zip's bytes


def _collect(obj: Any, prefix: str, out: dict[str, torch.Tensor], seen: set[int]) -> None:
    if isinstance(obj, torch.Tensor):
        out.setdefault(prefix.rstrip("."), obj)
        return
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, _ScriptRecord):
        _collect(obj.state, prefix, out, seen)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(k, str) and isinstance(v, (torch.Tensor, _ScriptRecord, dict, list, tuple)):
                _collect(v, f"{prefix}{k}.", out, seen)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _collect(v, f"{prefix}{i}.", out, seen)
