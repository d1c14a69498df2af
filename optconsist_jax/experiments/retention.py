"""The held-out retention documents, and the unigram floor of their loss.

`documents` is what the eval job scores for retention in the small
reproduction (experiments/reproduce.py hands it the same list);
`unigram_loss` is the loss a base must beat to be a language model of its
corpus.
"""

from __future__ import annotations

import re

import numpy as np

from optconsist_jax.data import corpus
from optconsist_jax.experiments import study


def documents(rc: study.ReproConfig) -> list[str]:
  """The held-out retention documents the eval job scores (in order).

  The first `eval.retention_docs` of the held-out stdlib files' docstrings
  (`corpus.python_stdlib_text`), one document per file or, with
  `eval.retention_unit="paragraph"`, per paragraph of them.
  """
  docs = corpus.python_stdlib_text("heldout")
  if rc.eval.retention_unit == "paragraph":
    docs = [p for d in docs for p in re.split(r"\n\s*\n", d) if p.strip()]
  if len(docs) < rc.eval.retention_docs:
    raise ValueError(
        f"reproduce config.eval.retention_docs={rc.eval.retention_docs}: the"
        f" held-out corpus has {len(docs)} {rc.eval.retention_unit}"
        " documents")
  return docs[:rc.eval.retention_docs]


def unigram_loss(rc: study.ReproConfig, tokenizer_path: str) -> float:
  """The retention loss of a unigram model of the pretraining corpus.

  The floor a base must beat to be a language model of its corpus: token
  frequencies of the docstrings' training split (add-one smoothed over the
  vocabulary), scored on exactly the tokens the eval job's retention loss
  scores (every token after BOS of the retention documents,
  `documents`, EOS included; evaluate/lm_loss.py), in nats per
  token.
  """
  tokenizer = study.load_tokenizer(tokenizer_path)
  counts = np.ones(tokenizer.vocab_size, np.float64)
  for doc in corpus.python_stdlib_text("train"):
    ids = tokenizer.encode(doc, eos=True)
    np.add.at(counts, np.asarray(ids, np.int64), 1.0)
  log_p = np.log(counts / counts.sum())
  targets = []
  for doc in documents(rc):
    targets += tokenizer.encode(doc, bos=True, eos=True)[1:]
  return float(-log_p[np.asarray(targets, np.int64)].mean())
