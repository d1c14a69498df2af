"""optconsist_jax: does finetuning with the pretraining optimizer forget less?

A JAX/Flax reimplementation of the experiments of arXiv 2605.06654.
"""
