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

import json
import os
import pickle
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
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
        with warnings.catch_warnings():  # a pickle not from torch.save: the error below says it all
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
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


def read_json(path: str | os.PathLike, what: str = "record") -> dict[str, Any]:
    """A JSON object beside weights (config.json, mapper.json, heads.json, ...): anything else (missing,
    not JSON, nested too deep, not an object) is a `WeightsError` naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"{what} '{path}' does not exist") from None
    except (OSError, ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise WeightsError(f"{what} '{path}' is not a JSON file ({_short(e)})") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{what} '{path}' holds a JSON {type(data).__name__}, not an object")
    return data


@contextmanager
def malformed(path: str | os.PathLike, what: str = "record") -> Iterator[None]:
    """Reading the keys of a record (a JSON file, a checkpoint's dict) inside this block: a missing key, a
    value of the wrong type or shape is one `WeightsError` naming the file and the key, not a traceback."""
    try:
        yield
    except WeightsError:
        raise
    except KeyError as e:
        raise WeightsError(f"{what} '{path}': key {_short(e)} is missing") from None
    except ValueError as e:
        if str(path) in str(e):  # already one line naming the file
            raise
        raise WeightsError(f"{what} '{path}' is malformed ({_short(e)})") from None
    except (TypeError, IndexError, AttributeError, RuntimeError) as e:
        raise WeightsError(f"{what} '{path}' is malformed ({_short(e)})") from None


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


class _Inert:
    """A storage or a tensor while data.pkl is unpickled: a record the pickle cannot change. BUILD
    (``__setstate__``: torch's would ``set_`` a tensor onto a resized storage of uninitialised memory),
    SETITEM(S) and APPEND(S) on it fail, so the pickle's ops touch only plain containers and records;
    the tensors are made after unpickling, each checked against its storage's bytes."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise TypeError("data.pkl changes a tensor or storage after building it")


class _StorageRef(_Inert):
    __slots__ = ("dtype", "key", "numel")

    def __init__(self, dtype: torch.dtype, key: str, numel: int) -> None:
        self.dtype, self.key, self.numel = dtype, key, numel


class _TensorRef(_Inert):
    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage: _StorageRef, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > 64:
        raise TypeError(f"tensor {what} {str(value)[:60]!r} is not a tuple of integers")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise TypeError(f"tensor {what} {str(value)[:60]!r} is not a tuple of integers >= 0")
    return tuple(value)


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """torch._utils._rebuild_tensor_v2, as a record checked to lie inside its storage (made into a tensor
    after unpickling, `_materialize`)."""
    if not isinstance(storage, _StorageRef):
        raise TypeError("a tensor's storage is not a storage record")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise TypeError(f"tensor offset {str(offset)[:60]!r} is not an integer >= 0")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride):
        raise TypeError(f"tensor size {size} and stride {stride} differ in length")
    if all(size):  # the last element it reads; an empty tensor reads nothing
        end = offset + sum((n - 1) * st for n, st in zip(size, stride)) + 1
        if end > storage.numel:
            raise TypeError(f"tensor {size} at offset {offset} reads past its storage of {storage.numel}")
    return _TensorRef(storage, offset, size, stride)


def _build_ordered_dict(*args: Any) -> dict:
    return dict(*args)


# Entries read from an archive are checked against these before a byte is inflated: data.pkl holds names
# and records (CLIP's: under 1 MiB), a storage exactly its elements' bytes.
MAX_PICKLE_BYTES = 64 << 20
MAX_DEPTH = 256  # nesting of records in data.pkl (a module tree is a few levels deep)


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

    def persistent_load(self, pid: Any) -> _StorageRef:
        # ('storage', storage type, key, location, numel): the bytes are the zip entry data/<key>
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise WeightsError(f"{self.what} '{self.path}': unexpected record {str(pid)[:80]} in data.pkl")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType):
            raise WeightsError(f"{self.what} '{self.path}': unknown storage type in data.pkl")
        if not isinstance(key, str) or isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
            raise WeightsError(f"{self.what} '{self.path}': malformed storage record {str(pid)[:80]}")
        return _StorageRef(stype.dtype, key, numel)


def _read_storage(zf: zipfile.ZipFile, prefix: str, ref: _StorageRef, what: str, path: Path) -> torch.Tensor:
    """The storage's bytes as a flat tensor, its entry's declared size checked before it is inflated."""
    itemsize = torch.empty((), dtype=ref.dtype).element_size()
    try:
        info = zf.getinfo(f"{prefix}data/{ref.key}")
    except KeyError:
        raise WeightsError(f"{what} '{path}': storage {ref.key[:40]!r} is missing from the archive") from None
    if info.file_size != ref.numel * itemsize:
        raise WeightsError(
            f"{what} '{path}': storage {ref.key[:40]} holds {info.file_size} bytes, its tensors need "
            f"{ref.numel * itemsize}: the archive is truncated or crafted"
        )
    if not info.file_size:
        return torch.empty(0, dtype=ref.dtype)
    raw = bytearray(zf.read(info))
    if len(raw) != info.file_size:  # a lying header
        raise WeightsError(f"{what} '{path}': storage {ref.key[:40]} is truncated")
    return torch.frombuffer(raw, dtype=ref.dtype)


def read_torchscript_tensors(path: str | Path, what: str = "weights") -> dict[str, torch.Tensor]:
    """The named tensors of a TorchScript module archive (its state_dict names), without running it.

    A module is pickled as its class (here an inert record) plus an attribute dict: parameters, buffers
    and submodules by name, so walking the records gives the state_dict's dotted names. A class whose
    state is not a dict (a custom ``__getstate__``) gives positional names ``<prefix>.<i>``. Anything
    malformed (sizes out of their storage, an entry larger than it says, nesting past `MAX_DEPTH`, ...) is
    a `WeightsError`.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            data = next((n for n in names if n.endswith("data.pkl") and n.count("/") == 1), None)
            if data is None:
                raise WeightsError(f"{what} '{path}' is a TorchScript archive without data.pkl")
            if zf.getinfo(data).file_size > MAX_PICKLE_BYTES:
                raise WeightsError(
                    f"{what} '{path}': data.pkl declares {zf.getinfo(data).file_size} bytes, more than the "
                    f"{MAX_PICKLE_BYTES} a module's records take: the archive is crafted"
                )
            prefix = data[: -len("data.pkl")]
            with zf.open(data) as f:
                root = _ScriptUnpickler(zf, prefix, f, what, path).load()
            refs = _collect(root, what, path)
            storages: dict[str, torch.Tensor] = {}
            out: dict[str, torch.Tensor] = {}
            for name, ref in refs.items():
                s = ref.storage
                if s.key not in storages:
                    storages[s.key] = _read_storage(zf, prefix, s, what, path)
                flat = storages[s.key]
                if flat.dtype != s.dtype or flat.numel() != s.numel:
                    raise WeightsError(
                        f"{what} '{path}': storage {s.key[:40]} is declared twice, differently"
                    )
                out[name] = torch.as_strided(flat, ref.size, ref.stride, ref.offset).clone()  # own memory
            return out
    except WeightsError:
        raise
    except Exception as e:  # zip, pickle, type and size errors: whatever a damaged or crafted file raises
        raise WeightsError(
            f"{what} '{path}' is a damaged or crafted TorchScript archive ({_short(e)}): download or copy it "
            "again"
        ) from None


def _collect(root: Any, what: str, path: Path) -> dict[str, _TensorRef]:
    """The tensors under ``root`` by dotted name, walked iteratively (no recursion limit to hit), at most
    `MAX_DEPTH` levels deep; each object once."""
    out: dict[str, _TensorRef] = {}
    seen: set[int] = set()
    stack: list[tuple[Any, str, int]] = [(root, "", 0)]
    while stack:
        obj, prefix, depth = stack.pop()
        if isinstance(obj, _TensorRef):
            out.setdefault(prefix.rstrip("."), obj)
            continue
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if depth > MAX_DEPTH:
            raise WeightsError(f"{what} '{path}': data.pkl nests records more than {MAX_DEPTH} levels deep")
        children: list[tuple[Any, str]] = []
        if isinstance(obj, _ScriptRecord):
            children = [(obj.state, prefix)]
        elif isinstance(obj, dict):
            children = [(v, f"{prefix}{k}.") for k, v in obj.items() if isinstance(k, str)]
        elif isinstance(obj, (list, tuple)):
            children = [(v, f"{prefix}{i}.") for i, v in enumerate(obj)]
        kinds = (_TensorRef, _ScriptRecord, dict, list, tuple)
        # reversed: the stack pops them in order, so the first name of a shared tensor is the first found
        stack.extend((v, p, depth + 1) for v, p in reversed(children) if isinstance(v, kinds))
    return out
