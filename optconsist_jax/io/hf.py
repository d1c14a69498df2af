"""Hugging Face checkpoints (config.json + safetensors) <-> our models.

`load` reads a Hugging Face folder of a supported model_type (llama with or
without Llama-3 rope scaling, qwen2, qwen3, olmo2: `(LlamaConfig, Llama)`;
deepseek_v3: `(DeepseekV3Config, DeepseekV3)`); `save` writes one back that
`transformers` loads. The name and config.json mappings are io/hf_layout.py
(the Llama family) and io/hf_deepseek.py.

Memory: neither direction holds two copies of the model on the host. `load`
creates the model abstractly and fills each parameter with
`jax.make_array_from_callback`, whose callback reads only the slice of each
layer's tensor that one device shard needs, straight from the memory-mapped
safetensors file. `save` gathers one layer's tensor at a time and streams it
into the file (format: https://github.com/huggingface/safetensors#format).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from flax import nnx
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors

from optconsist_jax.io import hf_deepseek
from optconsist_jax.io import hf_layout
from optconsist_jax.io import hub
from optconsist_jax import sharding
from optconsist_jax import storage
from optconsist_jax.model import deepseek_v3
from optconsist_jax.model import LlamaConfig
from optconsist_jax.model import llama
from optconsist_jax.model import moe
from optconsist_jax.model.deepseek_v3_config import DeepseekV3Config
from optconsist_jax.model.llama import no_constraint

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Shards written by `save` stay below this many bytes (a single tensor larger
# than this gets a shard of its own).
DEFAULT_MAX_SHARD_BYTES = 2 * 10**9

_SAFETENSORS_DTYPES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.float64): "F64",
}
# What of a bucket folder `load` downloads.
_HF_FILES = ("*.json", "*.safetensors", "tokenizer.model")


class _Family:
  """The Llama family's mapping (hf_layout) in hf_deepseek's interface."""

  config_from_hf = staticmethod(hf_layout.config_from_hf)
  config_to_hf = staticmethod(hf_layout.config_to_hf)
  tensor_sources = staticmethod(hf_layout.tensor_sources)
  abstract_model = staticmethod(llama.abstract_model)
  FLOAT32_PATHS = ()

  @staticmethod
  def save_order(config):
    return [("embed", ()),
            *((path, (i,)) for i in range(config.num_layers)
              for path in hf_layout.layer_tensors(config)),
            ("final_norm/scale", ()),
            *([] if config.tie_embeddings else [("lm_head/kernel", ())])]

  @staticmethod
  def is_unused(config, name):
    return name.endswith(hf_layout.IGNORED_SUFFIXES) or (
        config.tie_embeddings
        and name == hf_layout.GLOBAL_TENSORS["lm_head/kernel"][0])


class _DeepseekV3:
  """DeepSeek-V3's mapping (hf_deepseek)."""

  config_from_hf = staticmethod(hf_deepseek.config_from_hf)
  config_to_hf = staticmethod(hf_deepseek.config_to_hf)
  tensor_sources = staticmethod(hf_deepseek.tensor_sources)
  save_order = staticmethod(hf_deepseek.save_order)
  is_unused = staticmethod(hf_deepseek.is_unused)
  abstract_model = staticmethod(deepseek_v3.abstract_model)
  FLOAT32_PATHS = hf_deepseek.FLOAT32_PATHS


def _layout(model_type_or_config):
  if (model_type_or_config == hf_deepseek.MODEL_TYPE
      or isinstance(model_type_or_config, DeepseekV3Config)):
    return _DeepseekV3
  return _Family


def _flat_names(names) -> list[str]:
  """The names of a (nested, for stacked experts) hf_names tuple."""
  if isinstance(names, str):
    return [names]
  return [n for sub in names for n in _flat_names(sub)]


def _depth(source: hf_layout.TensorSource) -> int:
  """Leading stacked axes of our param: 0, 1 (layers), 2 (layers, experts)."""
  if not source.stacked:
    return 0
  depth, names = 0, source.hf_names
  while not isinstance(names, str):
    depth, names = depth + 1, names[0]
  return depth


# --------------------------------------------------------------------------
# load


def _read_config(hf_dir: str) -> dict[str, Any]:
  path = os.path.join(hf_dir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{path}: no config.json; expected a Hugging Face Llama folder"
        " (config.json + model.safetensors or a sharded index).")
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: invalid JSON: {e}") from e


def _weight_map(hf_dir: str) -> tuple[dict[str, str], str]:
  """Tensor name -> file name, and the file that said so (for errors)."""
  index_path = os.path.join(hf_dir, INDEX_FILE)
  single_path = os.path.join(hf_dir, SINGLE_FILE)
  if os.path.isfile(index_path):
    with open(index_path) as f:
      try:
        weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{index_path}: not a safetensors index with a"
                         f" 'weight_map': {e!r}") from e
    for name in sorted(set(weight_map.values())):
      if not os.path.isfile(os.path.join(hf_dir, name)):
        raise FileNotFoundError(
            f"{index_path} lists shard {name!r}, which is missing from"
            f" {hf_dir}.")
    return dict(weight_map), index_path
  if os.path.isfile(single_path):
    with safetensors.safe_open(single_path, "numpy") as f:
      return {name: SINGLE_FILE for name in f.keys()}, single_path
  raise FileNotFoundError(
      f"{hf_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found (only"
      " safetensors checkpoints are supported, not pytorch_model.bin).")


def _single_device_sharding() -> jax.sharding.Sharding:
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _slice_fn(source: hf_layout.TensorSource, handle: Callable[[str], Any],
              dtype: np.dtype) -> Callable[[tuple[slice, ...]], np.ndarray]:
  """The make_array_from_callback callback for one of our parameters.

  Reads, for the requested index of our (stacked, transposed) array, only the
  matching rows/columns of each needed layer's Hugging Face tensor.
  """

  def read(name: str, idx: tuple[slice, ...]) -> np.ndarray:
    if source.transpose:
      return handle(name)[idx[1], idx[0]].T.astype(dtype)
    return handle(name)[idx].astype(dtype)

  def build(names, index: tuple[slice, ...]) -> np.ndarray:
    if isinstance(names, str):
      return read(names, index)
    return np.stack([build(names[i], index[1:])
                     for i in range(len(names))[index[0]]])

  def cb(index: tuple[slice, ...]) -> np.ndarray:
    if not source.stacked:
      return np.ascontiguousarray(read(source.hf_names[0], tuple(index)))
    return build(source.hf_names, tuple(index))

  return cb


def load(hf_dir: str, dtype: Any = jnp.float32, *, mesh: Any = None,
         rules: Any = None, compute_dtype: Any = None,
         **config_overrides) -> tuple[Any, nnx.Module]:
  """Loads a Hugging Face folder or Hub repo into our model.

  Args:
    hf_dir: folder with config.json and model.safetensors, or a sharded
      checkpoint (model.safetensors.index.json + the shards it lists); or a
      Hub repo `org/name[@revision]` / `hf://org/name[@revision]` (see
      optconsist_jax.io.hub): its config, tokenizer and safetensors files are
      downloaded into the Hugging Face cache first (every host into its own);
      or a bucket folder (gs://...), whose files are downloaded likewise
      (storage.local_copy).
    dtype: parameter dtype (weights are cast on read).
    mesh: a `jax.sharding.Mesh`; params are created directly in the
      shardings `optconsist_jax.sharding.state_shardings` gives for `rules`.
      None puts every param on the first device.
    rules: logical-axis rules for `mesh` (e.g. `sharding.RULES` or
      `sharding.MeshConfig.rules`); required with a mesh.
    compute_dtype: activation/matmul dtype; default `dtype`.
    **config_overrides: further LlamaConfig / DeepseekV3Config fields
      (scan_layers, remat_policy, attention_impl, moe_impl, ...).

  Returns:
    (config, model): LlamaConfig and Llama, or DeepseekV3Config and
    DeepseekV3 for model_type deepseek_v3; the model called on int32 tokens
    [B, T] returns float32 logits [B, T, V].

  Raises:
    FileNotFoundError: config.json, the weights or a listed shard is missing.
    hub.HubError: the Hub download failed (one-line message).
    ValueError: not a supported config, or a tensor is missing or misshapen (the
      message names the file and the tensor).
  """
  # A bucket folder (gs://) is downloaded into a local cache once:
  # safetensors reads through a memory map of a local file.
  hf_dir = storage.local_copy(hub.model_dir(hf_dir), _HF_FILES)
  hf_config = _read_config(hf_dir)
  layout = _layout(hf_config.get("model_type"))
  config = layout.config_from_hf(hf_config,
                                 source=os.path.join(hf_dir, CONFIG_FILE))
  dtype = np.dtype(jnp.dtype(dtype))
  config = config.replace(
      param_dtype=dtype.name,
      dtype=jnp.dtype(compute_dtype or dtype).name,
      **config_overrides)
  weight_map, map_file = _weight_map(hf_dir)
  sources = layout.tensor_sources(config)

  known = {n for s in sources.values() for n in _flat_names(s.hf_names)}
  unexpected = sorted(n for n in weight_map if n not in known
                      and not layout.is_unused(config, n))
  if unexpected:
    raise ValueError(
        f"{map_file}: tensors not part of a {hf_config.get('model_type')}"
        " model with this config:"
        f" {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")

  constrain = no_constraint
  if mesh is not None:
    if rules is None:
      raise ValueError("hf.load: a mesh needs its logical-axis rules (e.g."
                       " optconsist_jax.sharding.MeshConfig(...).rules).")
    constrain = sharding.LogicalConstraint(mesh, rules)
  abstract = layout.abstract_model(config, constrain=constrain)
  graphdef, abstract_state = nnx.split(abstract)
  if mesh is None:
    shardings = jax.tree.map(lambda _: _single_device_sharding(),
                             abstract_state)
  else:
    shardings = sharding.state_shardings(abstract_state, mesh, rules)

  with contextlib.ExitStack() as stack:
    handles: dict[str, Any] = {}

    def tensor(name: str):
      file_name = weight_map[name]
      if file_name not in handles:
        handles[file_name] = stack.enter_context(safetensors.safe_open(
            os.path.join(hf_dir, file_name), "numpy"))
      return handles[file_name].get_slice(name)

    def fill(key_path, leaf, target_sharding):
      path = sharding.path_name(key_path)
      if path not in sources:
        raise ValueError(f"hf.load: no Hugging Face tensor for param {path!r}")
      source = sources[path]
      per_layer = leaf.shape[_depth(source):]
      expected = tuple(reversed(per_layer)) if source.transpose else per_layer
      for name in _flat_names(source.hf_names):
        if name not in weight_map:
          raise ValueError(
              f"{map_file}: missing tensor {name!r} (for param {path!r},"
              f" expected shape {list(expected)}).")
        found = tuple(tensor(name).get_shape())
        if found != tuple(expected):
          raise ValueError(
              f"{os.path.join(hf_dir, weight_map[name])}: tensor {name!r} has"
              f" shape {list(found)}, expected {list(expected)} from"
              f" {CONFIG_FILE}.")
      return jax.make_array_from_callback(
          leaf.shape, target_sharding, _slice_fn(source, tensor, dtype),
          dtype=dtype)

    state = jax.tree_util.tree_map_with_path(fill, abstract_state, shardings)
  return config, nnx.merge(graphdef, state)


# --------------------------------------------------------------------------
# save


def _host_value(x: jax.Array) -> np.ndarray:
  """A (possibly sharded, possibly multi-host) array gathered to this host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _hf_tensors(config: Any, model: nnx.Module, dtype: np.dtype
                ) -> Iterator[tuple[str, tuple[int, ...], np.dtype,
                                    Callable[[], np.ndarray]]]:
  """(HF name, HF shape, dtype, reader) in Hugging Face order; readers
  gather lazily."""
  layout = _layout(config)
  params = {sharding.path_name(kp): leaf for kp, leaf in
            jax.tree_util.tree_flatten_with_path(nnx.state(
                model, (nnx.Param, moe.RoutingBias)))[0]}
  sources = layout.tensor_sources(config)
  missing = sorted(set(sources) - set(params))
  if missing:
    raise ValueError(f"hf.save: model lacks params {missing} for its config.")
  extra = sorted(set(params) - set(sources))
  if extra:
    raise ValueError(
        f"hf.save: params {extra[:8]} have no Hugging Face tensor (merge"
        " LoRA adapters into the base weights before saving).")

  def entry(path: str, index: tuple[int, ...]):
    source, value = sources[path], params[path]
    shape = value.shape[len(index):]
    if source.transpose:
      shape = tuple(reversed(shape))
    names = source.hf_names
    for i in index:
      names = names[i]
    name = names if index else names[0]
    out_dtype = (np.dtype(np.float32) if path in layout.FLOAT32_PATHS
                 else dtype)

    def read():
      x = _host_value(value[index] if index else value)
      return np.ascontiguousarray((x.T if source.transpose else x)
                                  .astype(out_dtype))

    return name, tuple(int(s) for s in shape), out_dtype, read

  for path, index in layout.save_order(config):
    yield entry(path, index)


def _write_safetensors(path: str, tensors) -> None:
  """Streams tensors into a safetensors file, one gathered tensor at a time."""
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for name, shape, dtype, _ in tensors:
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  header_bytes = json.dumps(header, separators=(",", ":")).encode()
  header_bytes += b" " * (-len(header_bytes) % 8)  # 8-byte aligned data
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(header_bytes)))
    f.write(header_bytes)
    for name, shape, _, read in tensors:
      x = read()
      if x.shape != shape:
        raise AssertionError(f"{name}: gathered {x.shape}, header {shape}")
      f.write(x.tobytes())


def save(config: LlamaConfig | DeepseekV3Config, model: nnx.Module,
         out_dir: str, *,
         dtype: Any = None,
         max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
  """Writes a Hugging Face folder (of the config's model_type) that
  transformers loads.

  Writes config.json and model.safetensors, or, when the weights exceed
  `max_shard_bytes`, model-0000i-of-0000n.safetensors shards plus
  model.safetensors.index.json. Each tensor is gathered to the host on its
  own (per layer for stacked params), so host memory holds at most one layer's
  tensor beyond the file buffers. In a multi-process run every process must
  call this (arrays are all-gathered); only process 0 writes.

  Args:
    config: the model's config.
    model: our Llama or DeepseekV3.
    out_dir: destination folder (created if missing); a bucket folder
      (gs://) is written locally first and then uploaded.
    dtype: dtype to store; default the config's param_dtype.
    max_shard_bytes: upper bound on one shard's tensor bytes.
  """
  out_dir = os.fspath(out_dir)
  if storage.is_remote(out_dir):
    # safetensors files are written by seeking and streaming: into a local
    # folder first, then copied to the bucket file by file.
    with tempfile.TemporaryDirectory(prefix="hf_save_") as local:
      save(config, model, local, dtype=dtype, max_shard_bytes=max_shard_bytes)
      if jax.process_index() == 0:
        storage.upload_dir(local, out_dir)
    return
  layout = _layout(config)
  if layout is _Family:
    try:
      hf_layout.model_type(config)
    except ValueError as e:
      raise ValueError(f"hf.save: {e}") from e
  dtype = np.dtype(jnp.dtype(dtype or config.param_dtype))
  if dtype not in hf_layout.TORCH_DTYPE_NAMES:
    raise ValueError(f"hf.save: unsupported dtype {dtype}; use float32,"
                     " bfloat16 or float16.")
  tensors = list(_hf_tensors(config, model, dtype))
  shards: list[list] = [[]]
  shard_bytes = 0
  for t in tensors:
    nbytes = int(np.prod(t[1], dtype=np.int64)) * t[2].itemsize
    if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
      shards.append([])
      shard_bytes = 0
    shards[-1].append(t)
    shard_bytes += nbytes

  write = jax.process_index() == 0
  if write:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
      json.dump(layout.config_to_hf(config,
                                    hf_layout.TORCH_DTYPE_NAMES[dtype]),
                f, indent=2)
  if len(shards) == 1:
    names = [SINGLE_FILE]
  else:
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
  for file_name, shard in zip(names, shards):
    if write:
      _write_safetensors(os.path.join(out_dir, file_name), shard)
    else:  # Still take part in the collective gathers.
      for _, _, _, read in shard:
        read()
  if write and len(shards) > 1:
    total = sum(int(np.prod(t[1], dtype=np.int64)) * t[2].itemsize
                for t in tensors)
    index = {"metadata": {"total_size": total},
             "weight_map": {t[0]: file_name
                            for file_name, shard in zip(names, shards)
                            for t in shard}}
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
      json.dump(index, f, indent=2)
