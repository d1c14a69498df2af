"""Import of nanoGPT-style `ckpt.pt` bases (the authors' GPT-2-small models).

The paper's small-model part (arXiv 2605.06654) released two GPT-2-small bases,
pretrained on OpenWebText with AdamW and with Muon, saved by a nanoGPT fork
(karpathy/nanoGPT train.py) as `ckpt.pt`: 12 layers, 12 heads, width 768,
context 1024, SwiGLU, no biases, learned absolute positions, vocab padded to
50304, GPT-2 BPE. `load_nanogpt(path)` turns such a file into our `Llama` with
`position_embedding="learned"` so it can be finetuned with the same configs.

Reading (no torch, no code from the file run): optconsist_jax.io.torch_pickle.

Name mapping (torch `nn.Linear.weight` is [out, in]; our kernels are
[in, out], stacked over layers on a leading L axis):

  nanoGPT key (`_orig_mod.` stripped)   ours
  transformer.wte.weight [V, D]         embed [V, D]
  transformer.wpe.weight [P, D]         pos_embed [P, D]
  transformer.h.{i}.ln_1.weight [D]     layers/attn_norm/scale [i]
  transformer.h.{i}.attn.c_attn.weight  [(N+2K)H, D] split q|k|v (nanoGPT's
                                        `.split(n_embd, dim=2)`), transposed
                                        -> layers/attn/{q,k,v}_proj/kernel [i]
  transformer.h.{i}.attn.c_proj.weight  layers/attn/o_proj/kernel [i] (.T)
  transformer.h.{i}.ln_2.weight         layers/mlp_norm/scale [i]
  transformer.h.{i}.mlp.*               layers/mlp/{gate,up,down}_proj/kernel
                                        per `MLP_LAYOUTS` below
  transformer.ln_f.weight               final_norm/scale
  lm_head.weight [V, D]                 tied with wte (nanoGPT ties them):
                                        dropped when equal to wte, else
                                        lm_head/kernel [D, V] (untied)
  transformer.h.{i}.attn.bias [1,1,T,T] nanoGPT's causal-mask buffer (saved
                                        when flash attention was off): ignored

The authors' SwiGLU parameter names are not public. `MLP_LAYOUTS` lists the
common ones; with `mlp_layout="auto"` the first layout whose keys and shapes
match layer 0 is used, and when none does the error lists the keys found.
Which of two same-shaped matrices is the gate cannot be read off a file, so
ambiguous layouts come in both orders and the usual convention is listed
first; a wrong gate/up order gives a far higher validation loss (the bases
report 3.011 / 2.976 on OpenWebText), in which case pass the other order.
A plain GELU MLP (standard nanoGPT: c_fc [4D, D] with c_fc [F, D] and
c_proj [D, F] of the same F) is detected and refused: the model is SwiGLU.

Entry points: `load_nanogpt(path)` -> (config, model); `read_config(path)`
(no weights read); `load_params_into(path, abstract_params, shardings,
model_config=...)` for io.weights (placed shard by shard on a mesh);
`torch_pickle.read_torch_checkpoint(path)` for the whole file as lazy tensors.

Normalization: nanoGPT uses LayerNorm without bias (eps 1e-5); a
`norm_type`/`norm`/`normalization` string (containing "rms" or "layer") or a
`use_rmsnorm`/`rmsnorm`/`rms_norm` bool in `model_args` or `config` switches
to RMSNorm; the `norm_type` argument overrides both. Attention is standard
causal softmax attention with 1/sqrt(head_dim) scaling and no RoPE.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from optconsist_jax.io import torch_pickle
from optconsist_jax.model.config import LlamaConfig
from optconsist_jax.model.llama import abstract_model
from optconsist_jax.model.llama import Llama

COMPILE_PREFIX = "_orig_mod."
GPT2_EOS_ID = 50256  # <|endoftext|>, GPT-2's only special token.
LAYER_NORM_EPS = 1e-5  # nanoGPT's F.layer_norm(..., 1e-5).

@dataclasses.dataclass(frozen=True)
class MlpLayout:
  """Where a SwiGLU MLP's gate/up/down matrices live under `...mlp.`.

  With `fused`, `gate` and `up` name the same [2F, D] matrix and
  `gate_first` says which half is the gate (torch `.chunk(2, dim=-1)`).
  """
  name: str
  gate: str
  up: str
  down: str
  fused: bool = False
  gate_first: bool = True


MLP_LAYOUTS = (
    # nanoGPT-style forks: c_proj(silu(c_fc(x)) * c_fc2(x)).
    MlpLayout("c_fc|c_fc2|c_proj", "c_fc", "c_fc2", "c_proj"),
    MlpLayout("c_fc2|c_fc|c_proj", "c_fc2", "c_fc", "c_proj"),
    # One fused matrix: g, u = c_fc(x).chunk(2, -1); c_proj(silu(g) * u).
    MlpLayout("c_fc[gate;up]|c_proj", "c_fc", "c_fc", "c_proj", fused=True),
    MlpLayout("c_fc[up;gate]|c_proj", "c_fc", "c_fc", "c_proj", fused=True,
              gate_first=False),
    # Meta Llama: w2(silu(w1(x)) * w3(x)).
    MlpLayout("w1|w3|w2", "w1", "w3", "w2"),
    # Hugging Face Llama.
    MlpLayout("gate_proj|up_proj|down_proj", "gate_proj", "up_proj",
              "down_proj"),
    # lit-gpt LLaMAMLP: proj(silu(fc_1(x)) * fc_2(x)).
    MlpLayout("fc_1|fc_2|proj", "fc_1", "fc_2", "proj"),
)
_LAYOUT_BY_NAME = {layout.name: layout for layout in MLP_LAYOUTS}


def strip_compile_prefix(state: dict[str, Any]) -> dict[str, Any]:
  """Drops torch.compile's `_orig_mod.` prefix (as nanoGPT's sample.py does)."""
  return {k[len(COMPILE_PREFIX):] if k.startswith(COMPILE_PREFIX) else k: v
          for k, v in state.items()}


def _lookup_norm_type(path: str, *sources: dict[str, Any]) -> str:
  for source in sources:
    for key in ("norm_type", "norm", "normalization", "layernorm_type"):
      value = source.get(key)
      if isinstance(value, str):
        low = value.lower()
        if "rms" in low:
          return "rms"
        if "layer" in low or low == "ln":
          return "layer"
        raise ValueError(f"{path}: {key}={value!r} names neither RMSNorm nor"
                         " LayerNorm; pass norm_type='rms' or 'layer'")
    for key in ("use_rmsnorm", "rmsnorm", "rms_norm"):
      if isinstance(source.get(key), bool):
        return "rms" if source[key] else "layer"
  return "layer"


def _detect_mlp_layout(path: str, state: dict[str, Any], d: int,
                       requested: str) -> MlpLayout:
  prefix = "transformer.h.0.mlp."
  found = sorted(k for k in state if k.startswith(prefix))
  names = {k[len(prefix):-len(".weight")]: state[k].shape
           for k in found if k.endswith(".weight")}

  def fits(layout: MlpLayout) -> bool:
    if not {layout.gate, layout.up, layout.down} <= set(names):
      return False
    if len(names) != len({layout.gate, layout.up, layout.down}):
      return False
    down = names[layout.down]
    if len(down) != 2 or down[0] != d:
      return False
    f = down[1]
    if layout.fused:
      return names[layout.gate] == (2 * f, d)
    return names[layout.gate] == (f, d) and names[layout.up] == (f, d)

  table = ", ".join(layout.name for layout in MLP_LAYOUTS)
  if requested != "auto":
    if requested not in _LAYOUT_BY_NAME:
      raise ValueError(f"mlp_layout={requested!r}; expected 'auto' or one of:"
                       f" {table}")
    layout = _LAYOUT_BY_NAME[requested]
    if not fits(layout):
      raise ValueError(
          f"{path}: mlp_layout={requested!r} does not match the file's layer-0"
          f" MLP weights {names}")
    return layout
  if set(names) == {"c_fc", "c_proj"} and len(names["c_proj"]) == 2 and (
      names["c_fc"] == (names["c_proj"][1], d)):
    raise ValueError(
        f"{path}: layer-0 MLP is nanoGPT's GELU MLP (c_fc {names['c_fc']},"
        f" c_proj {names['c_proj']}); this model implements SwiGLU only")
  for layout in MLP_LAYOUTS:
    if fits(layout):
      return layout
  raise ValueError(
      f"{path}: unknown SwiGLU layout: layer-0 MLP keys {found} with shapes"
      f" {names}; known layouts (gate|up|down under mlp.): {table}. See"
      " optconsist_jax/io/nanogpt.py for the mapping.")


def _get(path: str, state: dict[str, Any], key: str,
         shape: tuple[int, ...] | None = None) -> np.ndarray:
  if key not in state:
    raise ValueError(f"{path}: missing key {key!r} in the checkpoint's model"
                     " state dict")
  value = state[key]
  if shape is not None and tuple(value.shape) != shape:
    raise ValueError(f"{path}: key {key!r} has shape {tuple(value.shape)},"
                     f" expected {shape}")
  return value.numpy() if isinstance(value, torch_pickle.LazyTensor) else np.asarray(value)


def _required_arg(path: str, model_args: dict[str, Any], key: str) -> int:
  if key not in model_args:
    raise ValueError(f"{path}: model_args has no {key!r} (found"
                     f" {sorted(model_args)})")
  return int(model_args[key])


def _same_tensor(a: Any, b: Any) -> bool:
  """True when two state entries are the same weights (tied)."""
  if isinstance(a, torch_pickle.LazyTensor) and isinstance(b, torch_pickle.LazyTensor) and (
      a.storage == b.storage and a.offset == b.offset and a.shape == b.shape
      and a.stride == b.stride):
    return True  # Same storage: torch saved a tied parameter once.
  as_np = lambda x: x.numpy() if isinstance(x, torch_pickle.LazyTensor) else np.asarray(x)
  return np.array_equal(as_np(a), as_np(b))


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What `infer_config` found, for `convert_state_dict` to materialize."""
  config: LlamaConfig
  layout: MlpLayout
  state: dict[str, Any]
  ignored: frozenset[str]


def _plan(state: dict[str, Any], model_args: dict[str, Any], path: str,
          train_config: dict[str, Any] | None, norm_type: str | None,
          mlp_layout: str) -> _Plan:
  """Config and MLP layout from model_args and tensor shapes (no data read,
  except the two head tensors when they are stored separately)."""
  state = strip_compile_prefix(state)
  n_layer = _required_arg(path, model_args, "n_layer")
  n_head = _required_arg(path, model_args, "n_head")
  d = _required_arg(path, model_args, "n_embd")
  block = _required_arg(path, model_args, "block_size")
  vocab = _required_arg(path, model_args, "vocab_size")
  if d % n_head:
    raise ValueError(f"{path}: n_embd={d} not divisible by n_head={n_head}")
  h = d // n_head
  # nanoGPT's causal-mask buffer (flash attention off) is not a weight.
  ignored = frozenset(k for k in state
                      if re.fullmatch(r"transformer\.h\.\d+\.attn\.bias", k)
                      and len(state[k].shape) == 4)
  biases = sorted(k for k in state if k.endswith(".bias") and k not in ignored)
  if model_args.get("bias") or biases:
    raise ValueError(
        f"{path}: the checkpoint has bias terms (model_args bias="
        f"{model_args.get('bias')!r}, keys {biases[:4]}); only bias=False"
        " bases are supported")
  if norm_type is None:
    norm_type = _lookup_norm_type(path, model_args, train_config or {})
  elif norm_type not in ("layer", "rms"):
    raise ValueError(f"norm_type={norm_type!r}; expected 'layer' or 'rms'")
  layers_found = {int(m.group(1)) for k in state
                  if (m := re.match(r"transformer\.h\.(\d+)\.", k))}
  if layers_found != set(range(n_layer)):
    raise ValueError(f"{path}: model_args n_layer={n_layer} but the state dict"
                     f" has blocks {sorted(layers_found)}")
  qkv = state.get("transformer.h.0.attn.c_attn.weight")
  n_kv = n_head
  if qkv is not None and qkv.shape[0] != 3 * d:
    n_kv = (qkv.shape[0] // h - n_head) // 2
  n_kv = int(model_args.get("n_kv_head") or n_kv)
  if n_kv < 1 or n_head % n_kv:
    raise ValueError(f"{path}: 'transformer.h.0.attn.c_attn.weight' has shape"
                     f" {tuple(qkv.shape)}, not q|k|v for n_head={n_head}")
  layout = _detect_mlp_layout(path, state, d, mlp_layout)
  f = state[f"transformer.h.0.mlp.{layout.down}.weight"].shape[1]
  tied = True
  if "lm_head.weight" in state and "transformer.wte.weight" in state:
    tied = _same_tensor(state["lm_head.weight"], state["transformer.wte.weight"])
  eos = GPT2_EOS_ID if vocab > GPT2_EOS_ID else vocab - 1
  config = LlamaConfig(
      vocab_size=vocab, hidden_size=d, intermediate_size=f, num_layers=n_layer,
      num_heads=n_head, num_kv_heads=n_kv, head_dim=h,
      rms_norm_eps=LAYER_NORM_EPS, max_position_embeddings=block,
      tie_embeddings=tied, position_embedding="learned", norm_type=norm_type,
      bos_token_id=eos, eos_token_id=eos)
  return _Plan(config, layout, state, ignored)


def convert_state_dict(
    state: dict[str, Any], model_args: dict[str, Any], *, path: str = "",
    train_config: dict[str, Any] | None = None, norm_type: str | None = None,
    mlp_layout: str = "auto") -> tuple[LlamaConfig, dict[str, np.ndarray]]:
  """Maps a nanoGPT state dict to our config and flat params.

  Args:
    state: parameter name -> array (numpy or `torch_pickle.LazyTensor`); torch.compile's
      `_orig_mod.` prefix is allowed.
    model_args: the checkpoint's `model_args` (n_layer, n_head, n_embd,
      block_size, vocab_size, bias, optional n_kv_head).
    path: the file name, for error messages.
    train_config: the checkpoint's `config` (searched for the norm type).
    norm_type: "layer" or "rms" to override detection.
    mlp_layout: "auto" or a name from `MLP_LAYOUTS`.

  Returns:
    (config, params) with params keyed by '/'-joined param paths of `Llama`
    ('embed', 'layers/attn/q_proj/kernel', ...), float32 numpy arrays.
  """
  path = path or "<state dict>"
  plan = _plan(state, model_args, path, train_config, norm_type, mlp_layout)
  c, layout, state = plan.config, plan.layout, plan.state
  d, f, h = c.hidden_size, c.intermediate_size, c.head_dim
  n_head, n_kv = c.num_heads, c.num_kv_heads
  used = set(plan.ignored)

  def take(key, shape=None):
    used.add(key)
    return _get(path, state, key, shape)

  per_layer = collections.defaultdict(list)
  for i in range(c.num_layers):
    p = f"transformer.h.{i}."
    per_layer["attn_norm/scale"].append(take(p + "ln_1.weight", (d,)))
    per_layer["mlp_norm/scale"].append(take(p + "ln_2.weight", (d,)))
    qkv = take(p + "attn.c_attn.weight", ((n_head + 2 * n_kv) * h, d))
    q, k, v = np.split(qkv, [n_head * h, (n_head + n_kv) * h], axis=0)
    per_layer["attn/q_proj/kernel"].append(q.T)
    per_layer["attn/k_proj/kernel"].append(k.T)
    per_layer["attn/v_proj/kernel"].append(v.T)
    per_layer["attn/o_proj/kernel"].append(
        take(p + "attn.c_proj.weight", (d, n_head * h)).T)
    m = p + "mlp."
    if layout.fused:
      gate, up = np.split(take(m + layout.gate + ".weight", (2 * f, d)), 2)
      if not layout.gate_first:
        gate, up = up, gate
    else:
      gate = take(m + layout.gate + ".weight", (f, d))
      up = take(m + layout.up + ".weight", (f, d))
    per_layer["mlp/gate_proj/kernel"].append(gate.T)
    per_layer["mlp/up_proj/kernel"].append(up.T)
    per_layer["mlp/down_proj/kernel"].append(
        take(m + layout.down + ".weight", (d, f)).T)

  params = {
      "embed": take("transformer.wte.weight", (c.vocab_size, d)),
      "pos_embed": take("transformer.wpe.weight",
                        (c.max_position_embeddings, d)),
      "final_norm/scale": take("transformer.ln_f.weight", (d,)),
  }
  params.update({"layers/" + name: np.stack(arrays)
                 for name, arrays in per_layer.items()})
  if "lm_head.weight" in state:
    head = take("lm_head.weight", (c.vocab_size, d))
    if not c.tie_embeddings:
      params["lm_head/kernel"] = head.T
  unused = sorted(set(state) - used)
  if unused:
    raise ValueError(f"{path}: state dict keys not mapped to any parameter:"
                     f" {unused[:8]}{' ...' if len(unused) > 8 else ''}")
  params = {k: np.ascontiguousarray(v, dtype=np.float32)
            for k, v in params.items()}
  return c, params


def _open(path: str) -> tuple[dict[str, Any], dict[str, Any], dict | None]:
  """(state dict, model_args, train config) of a nanoGPT ckpt.pt."""
  ckpt = torch_pickle.read_torch_checkpoint(path)
  if not isinstance(ckpt, dict):
    raise ValueError(f"{path}: expected a dict checkpoint, got"
                     f" {type(ckpt).__name__}")
  for key in ("model", "model_args"):
    if key not in ckpt:
      raise ValueError(f"{path}: checkpoint has no {key!r} entry (found"
                       f" {sorted(ckpt)}); is it a nanoGPT ckpt.pt?")
  train_config = ckpt.get("config")
  return (dict(ckpt["model"]), dict(ckpt["model_args"]),
          train_config if isinstance(train_config, dict) else None)


def read_config(ckpt_path: str | os.PathLike, *, norm_type: str | None = None,
                mlp_layout: str = "auto") -> LlamaConfig:
  """The `LlamaConfig` of a nanoGPT `ckpt.pt`, without reading its weights.

  For experiment configs: `c.model = dataclasses.asdict(read_config(path))`
  (then override dtype, scan_layers, remat_policy... as usual).
  """
  path = os.fspath(ckpt_path)
  state, model_args, train_config = _open(path)
  return _plan(state, model_args, path, train_config, norm_type,
               mlp_layout).config


def load_nanogpt_params(
    ckpt_path: str | os.PathLike, *, norm_type: str | None = None,
    mlp_layout: str = "auto") -> tuple[LlamaConfig, dict[str, np.ndarray]]:
  """Reads a nanoGPT `ckpt.pt`: (config, flat float32 params by param path).

  For callers that place the params themselves (e.g. onto a sharded model);
  `load_nanogpt` builds the model.
  """
  path = os.fspath(ckpt_path)
  state, model_args, train_config = _open(path)
  return convert_state_dict(state, model_args, path=path,
                            train_config=train_config, norm_type=norm_type,
                            mlp_layout=mlp_layout)


# Fields that define the architecture (what a base's weights fix).
ARCHITECTURE_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_layers",
    "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings",
    "tie_embeddings", "position_embedding", "norm_type", "rms_norm_eps")


def check_architecture(file_config: LlamaConfig, model_config: LlamaConfig,
                       path: str) -> None:
  """Raises when `model_config` cannot hold the checkpoint's weights."""
  diffs = [f"{k}: config {getattr(model_config, k)!r}, file"
           f" {getattr(file_config, k)!r}" for k in ARCHITECTURE_FIELDS
           if getattr(model_config, k) != getattr(file_config, k)]
  if diffs:
    raise ValueError(
        f"{path}: config.model does not match the checkpoint ({'; '.join(diffs)})."
        " Build config.model from optconsist_jax.io.nanogpt.read_config(path).")


def _placed_state(abstract_params: nnx.State, params: dict[str, Any],
                  shardings: Any = None) -> nnx.State:
  """`params` (flat, '/'-keyed) as a State shaped like `abstract_params`."""
  sharding_of = {}
  if shardings is not None:
    for key_path, leaf in nnx.to_flat_state(shardings):
      sharding_of[key_path] = (leaf.get_value() if isinstance(leaf,
                                                              nnx.Variable)
                               else leaf)
  flat, expected = {}, set()
  for key_path, variable in nnx.to_flat_state(abstract_params):
    key = "/".join(str(k) for k in key_path)
    expected.add(key)
    if key not in params:
      raise ValueError(f"no value for model parameter {key!r}")
    target = variable.get_value()
    value = np.asarray(params[key]).astype(target.dtype)
    if value.shape != tuple(target.shape):
      raise ValueError(f"parameter {key!r}: shape {value.shape}, model"
                       f" expects {tuple(target.shape)}")
    where = sharding_of.get(key_path)
    if where is None:
      array = jnp.asarray(value)
    else:  # Each process builds only its own shards (works multi-host).
      array = jax.make_array_from_callback(value.shape, where,
                                           lambda index, v=value: v[index])
    flat[key_path] = variable.replace(array)
  extra = sorted(set(params) - expected)
  if extra:
    raise ValueError(f"values for unknown model parameters: {extra}")
  return nnx.from_flat_state(flat)


def set_params(model: nnx.Module, params: dict[str, Any]) -> None:
  """Writes flat '/'-keyed arrays into `model`'s nnx.Params (all required)."""
  nnx.update(model, _placed_state(nnx.state(model, nnx.Param), params))


def load_params_into(ckpt_path: str | os.PathLike, abstract_params: nnx.State,
                     shardings: Any = None, *,
                     model_config: LlamaConfig | None = None,
                     norm_type: str | None = None,
                     mlp_layout: str = "auto") -> nnx.State:
  """A `ckpt.pt`'s weights as an nnx.State of Params, placed for a mesh.

  io.weights' entry point (as `hf.load` for Hugging Face folders).

  Args:
    ckpt_path: the nanoGPT checkpoint.
    abstract_params: `nnx.state(abstract_model, nnx.Param)`; gives the tree,
      and each leaf's dtype.
    shardings: the matching tree of shardings (e.g.
      `sharding.state_shardings(abstract_params, mesh, rules)`), or None for
      the default device.
    model_config: when given, checked against the file's architecture.
    norm_type: "layer" or "rms" to override detection.
    mlp_layout: "auto" or a name from `MLP_LAYOUTS`.
  """
  path = os.fspath(ckpt_path)
  file_config, params = load_nanogpt_params(path, norm_type=norm_type,
                                            mlp_layout=mlp_layout)
  if model_config is not None:
    check_architecture(file_config, model_config, path)
  return _placed_state(abstract_params, params, shardings)


def load_nanogpt(ckpt_path: str | os.PathLike, dtype: Any = jnp.float32, *,
                 norm_type: str | None = None,
                 mlp_layout: str = "auto") -> tuple[LlamaConfig, Llama]:
  """A nanoGPT-style `ckpt.pt` as `(LlamaConfig, Llama)`.

  Args:
    ckpt_path: the `ckpt.pt` written by nanoGPT's train.py (or a fork).
    dtype: dtype of the parameters and of the computation.
    norm_type: "layer" or "rms" to override the detected normalization.
    mlp_layout: "auto" or a name from `MLP_LAYOUTS`.

  Returns:
    The config (learned positions, LayerNorm/RMSNorm, tied head when the file
    ties it) and the model holding the checkpoint's weights.
  """
  config, params = load_nanogpt_params(ckpt_path, norm_type=norm_type,
                                       mlp_layout=mlp_layout)
  name = jnp.dtype(dtype).name
  config = config.replace(param_dtype=name, dtype=name)
  model = abstract_model(config)
  set_params(model, params)
  return config, model
