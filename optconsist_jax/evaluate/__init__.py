"""The eval job and its evaluations: learning (math) and retention (LM loss, multiple choice).

`python -m optconsist_jax.evaluate --workdir W` (__main__.py) evaluates every
checkpoint of a run (watch.py, job.py, suite.py) and writes rows of the
results schema (results.py). The evaluations (math.py, multiple_choice.py,
lm_loss.py, harness.py) each take a model, a tokenizer and typed records
(optconsist_jax.data.records) and return scores plus per-item outputs.
"""
