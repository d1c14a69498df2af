"""The small reproduction's data stage: generated math problems and the
retention documents, written once into W/data/ and checked on a rerun.

A workdir's data are made once and every run names them by path, so a rerun
with other data settings would otherwise train and score new runs on the old
data without a word: each file is made again and compared with the one on
disk, which is kept when equal and refused when not.
"""

import json
import os

from optconsist_jax import errors
from optconsist_jax import storage
from optconsist_jax.data import synthetic
from optconsist_jax.experiments import retention as retention_lib
from optconsist_jax.experiments import study


def _check(path: str, text: str, made_by: str) -> None:
  """Checks that `path`, if it exists, holds `text` (see the module doc)."""
  if os.path.exists(path):
    with open(path, encoding="utf-8") as fh:
      if fh.read() == text:
        return
    raise errors.UserError(
        f"{path} holds other data than this config makes ({made_by}): it was"
        " written by another config. Rerun with the config the workdir was"
        " written with, or use a fresh --workdir. Nothing was written")


def write_math_data(rc: study.ReproConfig, data_dir: str) -> tuple[str, str]:
  """Generated train/test problems (MetaMathQA format).

  Made again on a rerun and compared with the workdir's files, which are
  kept: other problems (another `finetune.train_examples`, `finetune.levels`,
  `eval.math_examples` or `seed`) stop the study before anything is written.
  """
  train_file = os.path.join(data_dir, "math_train.json")
  test_file = os.path.join(data_dir, "math_test.json")
  f = rc.finetune
  train, test = synthetic.make_splits(f.train_examples, rc.eval.math_examples,
                                      rc.seed, levels=f.levels)
  made_by = (f"finetune.train_examples={f.train_examples},"
             f" finetune.levels={tuple(f.levels)},"
             f" eval.math_examples={rc.eval.math_examples}, seed={rc.seed}")
  # Both in MetaMathQA's format (a JSON list); the questions are disjoint.
  texts = {path: json.dumps([synthetic.render_metamath(p) for p in problems],
                            indent=0)
           for path, problems in ((test_file, test), (train_file, train))}
  for path, text in texts.items():
    _check(path, text, made_by)
  for path, text in texts.items():
    if not os.path.exists(path):
      storage.write_text(path, text)
  return train_file, test_file


def write_retention_data(rc: study.ReproConfig, data_dir: str) -> str:
  """The eval job's lm_loss.path: "stdlib" (its held-out files, as
  `retention_lib.documents` reads them), or with paragraph documents
  W/data/retention.jsonl (one {"text"} each), checked on a rerun as
  `write_math_data` checks its files."""
  if rc.eval.retention_unit == "file":
    return "stdlib"
  path = os.path.join(data_dir, "retention.jsonl")
  text = "".join(json.dumps({"text": doc}) + "\n"
                 for doc in retention_lib.documents(rc))
  _check(path, text, f"eval.retention_docs={rc.eval.retention_docs},"
                  f" eval.retention_unit={rc.eval.retention_unit!r}")
  if not os.path.exists(path):
    storage.write_text(path, text)
  return path
