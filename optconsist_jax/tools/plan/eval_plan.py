"""Ahead-of-time memory plan of the eval job and its probes, on a CPU.

`plan_eval(EvalPlanSpec(...))` compiles, for a Cloud TPU topology (or cpu-N),
the eval job's own jitted programs with abstract inputs laid out as the job
lays them out (ShapeDtypeStructs carrying the eval mesh's shardings; the
model built by `model.architecture.abstract_model` with the eval mesh's
activation constraints, as io/weights.py builds it):

  lm_loss, multiple_choice   evaluate/multiple_choice.py `_row_log_likelihood`
                             (the LM-loss eval scores through it too) at the
                             eval config's batch_size x max_len;
  math_prefill, math_decode  model/generate.py `_prefill`, `_decode_chunk`
                             (KV cache of prompt + new tokens) per protocol;
  probe_reference/NAME       evaluate/probes_geometry.py `_matrix_reference`
                             (the base's and displacement's SVDs) per matrix;
  probe_update/NAME          `_matrix_update` (the update's SVD) per matrix;
  probe_second_order         evaluate/probes.py `_second_order` (loss, grad,
                             Hessian-vector product);
  probe_activations          `residual_statistics`.

Each program's per-chip HBM is the same accounting as aot.py (arguments +
outputs - aliased + temporaries, from `compiled.memory_analysis()`). The
eval job holds more than a program's arguments: the checkpoint being scored,
the probes' base model (kept for every later checkpoint), its init while
the references are built, the references themselves and the held-out
batches (evaluate/job.py `Evaluator.probes`, evaluate/suite.py
`probe_base`). `resident_other_bytes` is what the job holds at that moment
that is not an argument of the program, so `combined = peak + resident_other`
is the HBM that phase needs per chip. The references (the geometry probe's
singular vectors, held from setup on) count as their reference program's
compile lays them out; until it is compiled in the same plan, whole on every
chip (`refs_estimated`: an upper bound). An update takes its references as
that compile outputs them. Programs with the same function and abstract
inputs (q/k/v/o kernels of one shape and layout) compile once. The command
line and tables are tools/plan/eval_report.py.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from optconsist_jax.tools.plan import aot

GIB = aot.GIB


@dataclasses.dataclass(frozen=True)
class EvalPlanSpec:
  """One eval job to plan.

  Attributes:
    model: the run's model: a preset name, a LlamaConfig dict or a config
      (the eval job builds the run's model config, dtypes included).
    eval_config: an EvalConfig, or a dict / ConfigDict for
      EvalConfig.from_dict (configs/*_eval.py get_config()). Its mesh,
      batch sizes, lengths and probes config are planned.
    topology: a TPU slice (platforms/tpu.py SLICES) or cpu-N.
    probes: plan the probes (the eval config's `probes`, enabled or not).
    pretrain_overlap: hold the base's init while the references are built
      (a base whose init is known); None: the probes config's.
    math_prompt_len: padded prompt tokens of a math batch; None: each
      protocol's longest prompt (GenerationConfig.max_prompt_len, fitted to
      the context), the worst case.
  """

  model: Any = "llama2_7b"
  eval_config: Any = None
  topology: str = "v5p-8"
  probes: bool = True
  pretrain_overlap: bool | None = None
  math_prompt_len: int | None = None


@dataclasses.dataclass
class ProgramResult:
  """One compiled program's per-chip HBM (bytes) and compile seconds."""

  name: str
  phase: str  # "eval" or "probes"
  shapes: str  # what it was compiled for, in words
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  peak_bytes: int
  resident_other_bytes: int
  compile_seconds: float
  reused: str = ""  # the program whose compile this one shares
  # Some references held beside it were not compiled in this plan: their
  # bytes are jax.eval_shape's, whole on every chip (an upper bound).
  refs_estimated: bool = False

  @property
  def combined_bytes(self) -> int:
    return self.peak_bytes + self.resident_other_bytes

  def row(self, hbm_gib: float | None) -> dict[str, Any]:
    fits = (None if hbm_gib is None
            else self.combined_bytes <= hbm_gib * GIB)
    return {"program": self.name, "phase": self.phase, "shapes": self.shapes,
            "args_gib": self.argument_bytes / GIB,
            "out_gib": self.output_bytes / GIB,
            "temp_gib": self.temp_bytes / GIB,
            "peak_gib": self.peak_bytes / GIB,
            "resident_other_gib": self.resident_other_bytes / GIB,
            "combined_gib": self.combined_bytes / GIB, "hbm_gib": hbm_gib,
            "fits": fits, "compile_s": self.compile_seconds,
            "reused": self.reused, "refs_estimated": self.refs_estimated}


@dataclasses.dataclass
class EvalPlanResult:
  spec: EvalPlanSpec
  mesh_shape: dict[str, int]
  hbm_gib: float | None
  param_bytes: int  # one model's params (+ other state) per chip
  programs: list[ProgramResult]

  def largest(self) -> ProgramResult:
    return max(self.programs, key=lambda p: p.combined_bytes)

  def fits(self) -> bool | None:
    if self.hbm_gib is None:
      return None
    return self.largest().combined_bytes <= self.hbm_gib * GIB


@dataclasses.dataclass
class Program:
  """A jitted function of the job and its abstract arguments (not compiled).

  `args` are positional, `kwargs` static keywords; `resident_other` the
  bytes per chip the job holds beside the arguments while it runs, but for
  the geometry references `held_refs` (matrix names) that it holds too.
  `state_from`: (program name, index) when args[index] is the output of
  that program (the decode state of prefill).
  """

  name: str
  phase: str
  shapes: str
  fn: Any
  args: tuple[Any, ...]
  kwargs: dict[str, Any]
  resident_other: int
  held_refs: tuple[str, ...] = ()
  # (program, index): args[index] is that program's output, placed where its
  # compile puts it.
  state_from: tuple[str, int] | None = None

  def lower(self):
    return self.fn.lower(*self.args, **self.kwargs)


def shard_bytes(tree: Any) -> int:
  """Bytes per chip of a tree of ShapeDtypeStructs carrying shardings."""
  # deferred: jax, which the plan CLI configures first (XLA_FLAGS).
  import jax  # pylint: disable=g-import-not-at-top
  return int(sum(aot._shard_bytes(x)  # pylint: disable=protected-access
                 for x in jax.tree.leaves(tree)))


def eval_config(spec: EvalPlanSpec):
  """The spec's EvalConfig (the eval job's defaults when None)."""
  # deferred: imports jax, which the plan CLI configures first.
  from optconsist_jax.evaluate.config import EvalConfig  # pylint: disable=g-import-not-at-top
  c = spec.eval_config
  if isinstance(c, EvalConfig):
    return c
  if c is None:
    return EvalConfig()
  return EvalConfig.from_dict(c.to_dict() if hasattr(c, "to_dict") else c)


def model_config(spec: EvalPlanSpec):
  """The run's model config: a preset name, a dict or a config."""
  # deferred: imports jax, which the plan CLI configures first.
  from optconsist_jax.model import architecture  # pylint: disable=g-import-not-at-top
  m = spec.model
  if isinstance(m, str):
    return architecture.preset(m)
  if isinstance(m, dict):
    return architecture.config_from_dict(m)
  return m


def _abstract_model(cfg, mesh, rules):
  """The eval model as the job holds it: sharded ShapeDtypeStructs.

  io/weights.py: `abstract_model(config, constrain=LogicalConstraint)`,
  params laid out by `sharding.state_shardings`.
  """
  # deferred: jax, which the plan CLI configures first (XLA_FLAGS).
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from optconsist_jax import sharding  # pylint: disable=g-import-not-at-top
  from optconsist_jax.model import architecture  # pylint: disable=g-import-not-at-top
  graphdef, state = nnx.split(architecture.abstract_model(
      cfg, constrain=sharding.LogicalConstraint(mesh, rules)))
  shardings = sharding.state_shardings(state, mesh, rules)
  placed = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      state, shardings)
  return nnx.merge(graphdef, placed)


def _batch(shape, dtype, mesh, rules, shard: bool = True):
  """A batch input: rows over the mesh's batch axes (as suite.probe_batches
  places the probes' batches) or, `shard=False`, replicated: the evals hand
  jit host arrays (multiple_choice.score_requests without a mesh,
  generate.greedy_decode), which it replicates over the params' devices."""
  # deferred: jax, which the plan CLI configures first (XLA_FLAGS).
  import jax  # pylint: disable=g-import-not-at-top
  from optconsist_jax import sharding  # pylint: disable=g-import-not-at-top
  P = jax.sharding.PartitionSpec  # pylint: disable=invalid-name
  sh = sharding.batch_sharding(mesh, sharding.as_rules(rules))
  rows = sh.spec[0] if len(sh.spec) else None
  shards = sharding.axes_size(mesh, rows) if rows is not None else 1
  if not shard or not shape or shape[0] % shards:
    return jax.ShapeDtypeStruct(shape, dtype,
                                sharding=jax.sharding.NamedSharding(mesh, P()))
  return jax.ShapeDtypeStruct(
      shape, dtype, sharding=jax.sharding.NamedSharding(mesh, P(rows)))


def programs(spec: EvalPlanSpec, devices: list[Any]
             ) -> tuple[list[Program], dict[str, int], int, dict[str, int]]:
  """The job's programs with abstract inputs, the mesh shape, one model's
  bytes per chip and, per matrix, its references' bytes per chip as
  jax.eval_shape gives them (whole on every chip: an upper bound until the
  reference program is compiled)."""
  # deferred: jax, which the plan CLI configures first (XLA_FLAGS).
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from optconsist_jax import sharding  # pylint: disable=g-import-not-at-top
  from optconsist_jax.evaluate import math as math_lib  # pylint: disable=g-import-not-at-top
  from optconsist_jax.evaluate import multiple_choice as mc  # pylint: disable=g-import-not-at-top
  from optconsist_jax.evaluate import probes as probes_lib  # pylint: disable=g-import-not-at-top
  from optconsist_jax.evaluate import probes_geometry as geometry  # pylint: disable=g-import-not-at-top
  from optconsist_jax.model import generate as gen  # pylint: disable=g-import-not-at-top
  # pylint: disable=protected-access  # the job's own jitted programs

  config = eval_config(spec)
  cfg = model_config(spec)
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = config.mesh.rules
  ft_model = _abstract_model(cfg, mesh, rules)
  graphdef, ft_state = nnx.split(ft_model)
  state_bytes = shard_bytes(ft_state)
  pc = config.probes
  probes_on = spec.probes
  overlap = (pc.pretrain_overlap if spec.pretrain_overlap is None
             else spec.pretrain_overlap) and "geometry" in pc.which
  # The probes' base (ProbeBase.model), held from the first probed
  # checkpoint on, and its params as the probes split them.
  base_model = _abstract_model(cfg, mesh, rules)
  p_graphdef, base_params, rest = probes_lib.split_model(base_model)
  _, ft_params, _ = probes_lib.split_model(ft_model)
  init_params = (nnx.state(_abstract_model(cfg, mesh, rules), nnx.Param)
                 if overlap else None)
  seq = min(pc.seq_len, int(cfg.max_position_embeddings))
  probe_batch = {
      "inputs": _batch((pc.batch_size, seq), jnp.int32, mesh, rules),
      "targets": _batch((pc.batch_size, seq), jnp.int32, mesh, rules),
      "weights": _batch((pc.batch_size, seq), jnp.float32, mesh, rules)}
  batches_bytes = (shard_bytes(probe_batch) * pc.hvp_batches
                   if {"second_order", "activations"} & set(pc.which) else 0)

  out: list[Program] = []
  fractions = tuple(pc.fractions)
  layer_batch = pc.layer_batch or None
  base_w = geometry.matrices(base_params)
  ft_w = geometry.matrices(ft_params)
  init_w = geometry.matrices(init_params) if init_params is not None else {}
  refs: dict[str, Any] = {}
  if probes_on and "geometry" in pc.which:
    for name, w in base_w.items():
      wi = init_w.get(name)
      layout = geometry._layout(w, layer_batch)
      refs[name] = jax.eval_shape(
          lambda a, b, layout=layout: geometry._matrix_reference(
              a, b, fractions, layout), w, wi)
  ref_bytes = {k: shard_bytes(v) for k, v in refs.items()}
  all_refs = tuple(refs)
  base_bytes = shard_bytes(nnx.state(base_model))
  held_probes = (base_bytes + batches_bytes) if probes_on else 0

  # Evals: the checkpoint's model, beside the probes' base when probing.
  def score(name, c, max_len):
    t = gen.fit_to_context(max_len, ft_model)
    b = c.batch_size
    args = (graphdef, ft_state,
            *(_batch((b, t), d, mesh, rules, shard=False) for d in (
                jnp.int32, jnp.int32, jnp.float32, jnp.int32)))
    out.append(Program(name, "eval", f"{b}x{t} tokens",
                       mc._row_log_likelihood, args, {}, held_probes,
                       all_refs))
  if config.lm_loss.path:
    score("lm_loss", config.lm_loss, config.lm_loss.max_len)
  mcc = config.multiple_choice
  if mcc.hellaswag or mcc.arc_challenge or mcc.winogrande:
    score("multiple_choice", mcc, mcc.max_len)
  if config.math.response_loss and config.math.test:
    # math.response_loss: the scorer at math.batch_size, its max_len default.
    score("math_response_loss", config.math, 1024)
  for protocol in config.math.protocols if config.math.test else ():
    g = math_lib.default_generation(protocol)
    n = config.math.max_new_tokens or g.max_new_tokens
    ctx = int(cfg.max_position_embeddings)
    p = spec.math_prompt_len or min(g.max_prompt_len, ctx - min(n, ctx // 2))
    b = config.math.batch_size
    tokens = _batch((b, p), jnp.int32, mesh, rules, shard=False)
    lens = _batch((b,), jnp.int32, mesh, rules, shard=False)
    done = _batch((b,), jnp.bool_, mesh, rules, shard=False)
    kw = {"max_new_tokens": n, "use_cache": True}
    out.append(Program(f"math_prefill/{protocol}", "eval",
                       f"{b}x{p} prompt + {n} new", gen._prefill,
                       (graphdef, ft_state, tokens, lens, done), kw,
                       held_probes, all_refs))
    state = jax.eval_shape(
        lambda s, t, l, d, kw=kw: gen._prefill(graphdef, s, t, l, d, **kw),
        ft_state, tokens, lens, done)
    # The decode state lives where prefill's compile puts it (plan_eval
    # substitutes those shardings, `state_from`); until then replicated.
    state = jax.tree.map(
        lambda a: _batch(a.shape, a.dtype, mesh, rules, shard=False), state)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    out.append(Program(f"math_decode/{protocol}", "eval",
                       f"{b} rows, cache {p + n}", gen._decode_chunk,
                       (graphdef, ft_state, state, lens, scalar, scalar,
                        scalar), {"use_cache": True}, held_probes, all_refs,
                       state_from=(f"math_prefill/{protocol}", 2)))

  if not probes_on:
    return out, dict(mesh.shape), state_bytes, {}
  ft_bytes = state_bytes
  init_bytes = shard_bytes(init_params) if init_params is not None else 0
  if "geometry" in pc.which:
    for name, w in base_w.items():
      wi = init_w.get(name)
      layout = geometry._layout(w, layer_batch)
      args_b = shard_bytes((w, wi))
      # Setup: checkpoint + base + init held, references built so far
      # (all of them, an upper bound; this one's are its outputs).
      other = ft_bytes + base_bytes + init_bytes - args_b + batches_bytes
      out.append(Program(f"probe_reference/{name}", "probes",
                         _shape_words(w, wi), geometry._matrix_reference,
                         (w, wi, fractions, layout), {}, other,
                         tuple(n for n in all_refs if n != name)))
    for name, w in base_w.items():
      layout = geometry._layout(w, layer_batch)
      args_b = shard_bytes((w, ft_w[name]))
      other = ft_bytes + base_bytes + batches_bytes - args_b
      # Its references as the reference program's compile lays them out.
      out.append(Program(f"probe_update/{name}", "probes",
                         _shape_words(w, None), geometry._matrix_update,
                         (refs[name], w, ft_w[name], fractions, layout), {},
                         other, tuple(n for n in all_refs if n != name),
                         state_from=(f"probe_reference/{name}", 0)))
  batch_words = f"{pc.batch_size}x{seq} tokens"
  if "second_order" in pc.which:
    args_b = shard_bytes((rest, base_params, ft_params, probe_batch))
    # `second_order` sums over hvp_batches: one more float32 gradient.
    grad_sum = (shard_bytes(jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32,
                                       sharding=a.sharding), base_params))
                if pc.hvp_batches > 1 else 0)
    other = (ft_bytes + base_bytes + batches_bytes + grad_sum
             - args_b + shard_bytes(rest))  # rest: each model has its own
    out.append(Program("probe_second_order", "probes", batch_words,
                       probes_lib._second_order,
                       (p_graphdef, rest, base_params, ft_params,
                        probe_batch),
                       {"layout": probes_lib.grad_layout(base_params)},
                       other, all_refs))
  if "activations" in pc.which:
    args_b = shard_bytes((rest, ft_params, probe_batch))
    other = ft_bytes + base_bytes + batches_bytes - args_b
    out.append(Program("probe_activations", "probes", batch_words,
                       probes_lib.residual_statistics,
                       (p_graphdef, rest, ft_params, probe_batch), {},
                       other, all_refs))
  return out, dict(mesh.shape), state_bytes, ref_bytes


def _shape_words(w, wi) -> str:
  s = "x".join(str(d) for d in w.shape)
  return f"{s} {w.dtype}" + (" + init" if wi is not None else "")


def _signature(p: Program) -> Any:
  """What makes two programs one compile: function, static args, inputs."""
  # deferred: jax, which the plan CLI configures first (XLA_FLAGS).
  import jax  # pylint: disable=g-import-not-at-top
  leaves, treedef = jax.tree.flatten((p.args, p.kwargs))
  return (id(p.fn), str(treedef), tuple(
      (x.shape, str(x.dtype), repr(getattr(x, "sharding", None)))
      if hasattr(x, "shape") else repr(x) for x in leaves))


def pruned_bytes(p: Program, r: ProgramResult) -> int:
  """Bytes of `p`'s array arguments the compiler dropped (unused: the head
  in the activation statistics); the job still holds them."""
  # deferred: jax, which the plan CLI configures first (XLA_FLAGS).
  import jax  # pylint: disable=g-import-not-at-top
  arrays = [x for x in jax.tree.leaves(p.args) if hasattr(x, "dtype")]
  return max(0, shard_bytes(arrays) - r.argument_bytes)


def compile_program(p: Program):
  """(compiled, seconds): the TPU (or CPU) compiler's output for `p`."""
  start = time.perf_counter()
  compiled = p.lower().compile()
  return compiled, time.perf_counter() - start


def plan_eval(spec: EvalPlanSpec, only: tuple[str, ...] = (),
              progress=None) -> EvalPlanResult:
  """Compiles the eval job's programs for `spec` and measures each.

  Args:
    spec: what to plan.
    only: name prefixes of the programs to compile, in this order (all, in
      the job's order, when empty).
    progress: called with each ProgramResult as it is measured and the
      chip's HBM GiB (None for cpu-N).
  """
  # deferred: jax, which the plan CLI configures first (XLA_FLAGS).
  import jax  # pylint: disable=g-import-not-at-top
  devices, hbm_gib = aot.topology_devices(spec.topology)
  progs, mesh_shape, state_bytes, ref_bytes = programs(spec, devices)
  if only:
    rank = {p.name: min((i for i, o in enumerate(only)
                         if p.name.startswith(o)), default=None)
            for p in progs}
    progs = sorted((p for p in progs if rank[p.name] is not None),
                   key=lambda p: rank[p.name])
  compiled_refs: set[str] = set()
  done: dict[Any, ProgramResult] = {}
  out_shardings: dict[str, Any] = {}
  results = []
  for p in progs:
    if p.state_from and p.state_from[0] in out_shardings:
      i = p.state_from[1]
      placed = jax.tree.map(
          lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
          p.args[i], out_shardings[p.state_from[0]])
      p = dataclasses.replace(p, args=(*p.args[:i], placed, *p.args[i + 1:]))
    key = _signature(p)
    if key in done:
      r = dataclasses.replace(done[key], name=p.name, phase=p.phase,
                              shapes=p.shapes, compile_seconds=0.0,
                              reused=done[key].name)
    else:
      compiled, seconds = compile_program(p)
      mem = compiled.memory_analysis()
      args, outb = int(mem.argument_size_in_bytes), int(
          mem.output_size_in_bytes)
      alias, temp = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
      r = ProgramResult(
          name=p.name, phase=p.phase, shapes=p.shapes, argument_bytes=args,
          output_bytes=outb, alias_bytes=alias, temp_bytes=temp,
          peak_bytes=args + outb - alias + temp, resident_other_bytes=0,
          compile_seconds=seconds)
      done[key] = r
      if any(q.state_from and q.state_from[0] == p.name for q in progs):
        out_shardings[p.name] = compiled.output_shardings
      del compiled
    if p.name.startswith("probe_reference/"):
      name = p.name.split("/", 1)[1]
      ref_bytes[name] = r.output_bytes
      compiled_refs.add(name)
    r = dataclasses.replace(
        r, resident_other_bytes=p.resident_other + pruned_bytes(p, r) + sum(
            ref_bytes[n] for n in p.held_refs),
        refs_estimated=any(n not in compiled_refs for n in p.held_refs))
    results.append(r)
    if progress is not None:
      progress(r, hbm_gib)
  return EvalPlanResult(spec=spec, mesh_shape=mesh_shape, hbm_gib=hbm_gib,
                        param_bytes=state_bytes, programs=results)
