"""Placeholder main job until the small reproduction lands: a tiny forward pass."""

from flax import nnx
import jax

from optconsist_jax.model import Llama, preset


def main():
  model = Llama(preset("tiny_gqa"), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 128)
  print("logits", model(tokens).shape)


if __name__ == "__main__":
  main()
