"""The sharded train state and its one builder.

abstract model (model.architecture.abstract_model: a Llama or a DeepSeek-V3
by the config's type) -> shardings
(sharding.state_shardings) -> jitted init whose `out_shardings` they are, so
every array is born in its shard and nothing is materialized whole on one
device. The abstract state (ShapeDtypeStructs carrying their shardings) is
what a checkpoint restore and an ahead-of-time compile target.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
from flax import nnx
import jax
import jax.numpy as jnp
import optax

from optconsist_jax import sharding
from optconsist_jax.model import architecture
from optconsist_jax.model import lora as lora_lib
from optconsist_jax.model import Llama


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes.

  Attributes:
    step: int32 scalar, number of optimizer updates applied.
    params: trainable variables (nnx.State), what the optimizer updates.
    frozen: every other model variable (nnx.State), e.g. base weights under
      LoRA; empty for full finetuning.
    opt_state: the optax state of `params`.
  """

  step: jax.Array
  params: nnx.State
  frozen: nnx.State
  opt_state: Any


def lora_pieces(lora_config: Any | None, seed: int
                ) -> tuple[Any, Callable[[Llama], Any] | None]:
  """(trainable filter, model transform) of a run: LoRA or full finetuning.

  With a LoRAConfig (or its dict), adapters are added to the built model
  (drawing from `nnx.Rngs(seed)`, so the base init is unchanged) and only
  they train; with None every nnx.Param trains.
  """
  if lora_config is None:
    return nnx.Param, None
  lora_config = lora_lib.LoRAConfig.from_dict(lora_config)

  def transform(model):
    return lora_lib.apply_lora(model, lora_config, rngs=nnx.Rngs(seed))
  return lora_lib.LoRAParam, transform


def _placed(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree`'s leaves carrying `shardings`."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      tree, shardings)


class StateBuilder:
  """Builds a run's train state: abstract model -> shardings -> jitted init.

  Attributes:
    graphdef: merge it with `(state.params, state.frozen)` to get the model.
    abstract_params: the trainable params as ShapeDtypeStructs carrying their
      NamedShardings: what `optim.build` needs (Muon reads the layout)
      before the optimizer, and so the state, can exist.
  """

  def __init__(self, model_config: architecture.ModelConfig,
               mesh: jax.sharding.Mesh,
               rules: sharding.Rules, *, trainable: Any = nnx.Param,
               transform: Callable[[Llama], Any] | None = None,
               seed: int = 0):
    """Traces the model abstractly; allocates nothing.

    Args:
      model_config: model shapes (LlamaConfig or DeepseekV3Config).
      mesh: device mesh (sharding.make_mesh).
      rules: logical-axis rules table.
      trainable: nnx filter of the variables the optimizer updates (e.g. a
        LoRA param type); the rest go to `TrainState.frozen`.
      transform: applied to the new model (e.g. LoRA's apply_lora, see
        `lora_pieces`).
      seed: init seed (nnx.Rngs(seed)).
    """
    self._mesh = mesh
    self._rules = sharding.as_rules(rules)
    self._trainable = trainable
    self._model_args = dict(
        constrain=sharding.LogicalConstraint(mesh, self._rules), seed=seed,
        transform=transform)
    self._model_config = model_config
    model = architecture.abstract_model(model_config, **self._model_args)
    self.graphdef, params, self._frozen = nnx.split(model, trainable, ...)
    self.abstract_params = _placed(
        params, sharding.state_shardings(params, mesh, self._rules))

  def abstract_state(self, tx: optax.GradientTransformation
                     ) -> tuple[TrainState, TrainState]:
    """(the state as ShapeDtypeStructs carrying shardings, its shardings)."""
    state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32),
                       params=self.abstract_params, frozen=self._frozen,
                       opt_state=jax.eval_shape(tx.init, self.abstract_params))
    shardings = sharding.state_shardings(state, self._mesh, self._rules)
    return _placed(state, shardings), shardings

  def init(self, tx: optax.GradientTransformation,
           base_params: nnx.State | None = None, base_opt_state: Any = None,
           adopt: Callable[[Any, Any], Any] | None = None) -> TrainState:
    """A new state, born in its shardings: random init, or `base_params`.

    `base_params` (e.g. io.weights.load_params) replace the variables they
    name; LoRA adapters keep their random init. `base_opt_state` (a base
    run's, train/base_optimizer_state.py) becomes the optimizer state
    through `adopt(fresh_opt_state, base_opt_state)`.
    """

    def init(base, base_opt):
      model = architecture.make_model(self._model_config, **self._model_args)
      if base is not None:
        nnx.update(model, base)
      _, params, frozen = nnx.split(model, self._trainable, ...)
      opt_state = tx.init(params)
      if base_opt is not None:
        opt_state = adopt(opt_state, base_opt)
      return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                        frozen=frozen, opt_state=opt_state)
    _, shardings = self.abstract_state(tx)
    return jax.jit(init, out_shardings=shardings)(base_params, base_opt_state)

  def split(self, full_params: nnx.State) -> tuple[nnx.State, nnx.State]:
    """Every model variable (as checkpoints hold them) -> (params, frozen)."""
    _, params, frozen = nnx.split(nnx.merge(self.graphdef, full_params),
                                  self._trainable, ...)
    return params, frozen


def full_params(state: TrainState) -> nnx.State:
  """Every model variable (trainable and frozen): what checkpoints hold."""
  return nnx.merge_state(state.params, state.frozen)
