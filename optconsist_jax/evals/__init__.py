"""Evaluations: learning (math accuracy) and retention (LM loss, multiple choice).

Each module takes a model, a tokenizer and typed records
(optconsist_jax.data.records) and returns scores plus per-item outputs;
optconsist_jax.evaluate runs them on checkpoints.
"""
