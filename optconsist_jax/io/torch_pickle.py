"""A `torch.save` checkpoint read without torch, and without running its code.

`torch.save` (new zipfile format, torch >= 1.6) writes
a zip holding `<name>/data.pkl` (a pickle, protocol 2), `<name>/data/<key>`
(one raw storage per key), `<name>/byteorder` and `<name>/version`. Tensors in
the pickle are `torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
...)` calls whose storage is a persistent id
`("storage", torch.FloatStorage, key, location, numel)`. `_RestrictedUnpickler`
maps exactly these globals (and a few harmless ones: OrderedDict, torch.Size,
torch dtypes, numpy scalars) to numpy-backed stand-ins and refuses every other
global, so loading a file never runs code from it (unlike `pickle.load` or
`torch.load(weights_only=False)`). Tensors are read lazily: only the model's
weights are materialized, not the optimizer state.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

# torch storage classes and dtypes (as pickled) -> numpy dtypes.
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "UntypedStorage": np.dtype(np.uint8),
}
_TORCH_DTYPES = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
}


class UnsafePickleError(pickle.UnpicklingError):
  """A checkpoint's pickle names a global outside the allowed set."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
  dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _Storage:
  """One `<name>/data/<key>` record of the zip, read on demand."""
  path: str
  record: str
  dtype: np.dtype
  numel: int
  big_endian: bool

  def read(self) -> np.ndarray:
    with zipfile.ZipFile(self.path) as zf:
      try:
        raw = zf.read(self.record)
      except KeyError:
        raise ValueError(f"{self.path}: storage record {self.record!r} is"
                         " missing from the zip") from None
    dtype = self.dtype.newbyteorder(">") if self.big_endian else self.dtype
    n = len(raw) // dtype.itemsize
    if n < self.numel:
      raise ValueError(
          f"{self.path}: storage {self.record!r} holds {n} elements of"
          f" {self.dtype}, the pickle says {self.numel}")
    return np.frombuffer(raw, dtype, count=self.numel)


@dataclasses.dataclass(frozen=True)
class LazyTensor:
  """A torch tensor of a checkpoint: shape/dtype now, data on `.numpy()`."""
  storage: _Storage
  offset: int
  shape: tuple[int, ...]
  stride: tuple[int, ...]
  dtype: np.dtype

  def numpy(self) -> np.ndarray:
    flat = self.storage.read()
    if not self.shape:
      return np.asarray(flat[self.offset]).astype(self.dtype)
    if 0 in self.shape:
      return np.zeros(self.shape, self.dtype)
    extent = self.offset + 1 + sum(
        (n - 1) * s for n, s in zip(self.shape, self.stride))
    if extent > flat.size or min(self.stride, default=0) < 0:
      raise ValueError(
          f"{self.storage.path}: tensor of shape {self.shape} at offset"
          f" {self.offset} overruns storage {self.storage.record!r}")
    view = np.lib.stride_tricks.as_strided(
        flat[self.offset:], shape=self.shape,
        strides=[s * flat.itemsize for s in self.stride], writeable=False)
    return np.ascontiguousarray(view).astype(self.dtype)  # native byte order


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
                       backward_hooks, metadata=None):
  del requires_grad, backward_hooks, metadata
  return LazyTensor(storage, int(storage_offset), tuple(size), tuple(stride),
                    storage.dtype)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad,
                       backward_hooks, dtype, metadata=None):
  """Untyped (byte) storage plus a dtype; offsets/strides count elements."""
  del requires_grad, backward_hooks, metadata
  typed = dataclasses.replace(storage, dtype=dtype,
                              numel=storage.numel // dtype.itemsize)
  return LazyTensor(typed, int(storage_offset), tuple(size), tuple(stride),
                    dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
  del requires_grad, backward_hooks, state
  return data


def _numpy_scalar(dtype, data=None):
  return np.frombuffer(data, dtype)[0] if data is not None else dtype.type()


def _codecs_encode(text, encoding="utf-8"):
  # Protocol-2 pickles write bytes as _codecs.encode(str, "latin1").
  return str(text).encode(str(encoding))


_SAFE_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    ("torch", "device"): str,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("_codecs", "encode"): _codecs_encode,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
}
_SAFE_GLOBALS.update({("torch", name): _StorageType(dtype)
                      for name, dtype in _STORAGE_DTYPES.items()})
_SAFE_GLOBALS.update({("torch", name): dtype
                      for name, dtype in _TORCH_DTYPES.items()})


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles torch's data.pkl with an allow-list of globals (no code runs)."""

  def __init__(self, file, *, path: str, prefix: str, big_endian: bool):
    super().__init__(file)
    self._path, self._prefix, self._big_endian = path, prefix, big_endian

  def find_class(self, module, name):
    try:
      return _SAFE_GLOBALS[(module, name)]
    except KeyError:
      raise UnsafePickleError(
          f"{self._path}: refusing to load global {module}.{name} from the"
          " checkpoint's pickle; only torch tensors/storages and plain"
          " containers are allowed (the file may be malicious, or hold"
          " objects other than a nanoGPT checkpoint)") from None

  def persistent_load(self, pid):
    if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
        or not isinstance(pid[1], _StorageType)):
      raise UnsafePickleError(
          f"{self._path}: unexpected persistent id {pid!r} in the pickle")
    _, storage_type, key, _, numel = pid
    return _Storage(self._path, f"{self._prefix}data/{key}",
                    storage_type.dtype, int(numel), self._big_endian)


def read_torch_checkpoint(path: str | os.PathLike) -> Any:
  """Unpickles a `torch.save` zip file without torch.

  Returns the saved object with every tensor replaced by a `LazyTensor`
  (call `.numpy()` to read it). Only the globals torch uses for tensors and
  plain containers are allowed; anything else raises `UnsafePickleError`.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint not found: {path}")
  if not zipfile.is_zipfile(path):
    raise ValueError(
        f"{path}: not a torch zip checkpoint (torch.save of torch >= 1.6);"
        " legacy tar/pickle files are not supported: re-save with a recent"
        " torch")
  with zipfile.ZipFile(path) as zf:
    pickles = [n for n in zf.namelist()
               if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise ValueError(f"{path}: expected one <name>/data.pkl record in the"
                       f" zip, found {pickles}")
    prefix = pickles[0][:-len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in zf.namelist():
      byteorder = zf.read(prefix + "byteorder").decode().strip()
    if byteorder not in ("little", "big"):
      raise ValueError(f"{path}: unknown byteorder record {byteorder!r}")
    with zf.open(pickles[0]) as f:
      unpickler = _RestrictedUnpickler(f, path=path, prefix=prefix,
                                       big_endian=byteorder == "big")
      try:
        return unpickler.load()
      except UnsafePickleError:
        raise
      except Exception as e:  # Truncated or otherwise corrupt pickle.
        raise ValueError(f"{path}: cannot unpickle {pickles[0]}: {e}") from e
