"""tfds builders (array_record) for MetaMathQA, GSM8K and the retention sets.

Each builder reads the published files from a manual directory with the
readers of formats.py (so the tfds path and the plain-file path produce the
same records) and writes array_record shards. Reading back uses
`tfds.data_source` / `builder.as_data_source`, which returns a random-access
source that grain consumes directly; no TensorFlow is needed to read.

Files expected in the manual directory (any subset; each present file becomes
a split; the first name present is used; the second names are what
`python -m optconsist_jax.data.fetch` and `python -m
optconsist_jax.data.synthetic` write, so their OUT_DIR is a manual directory):

  optconsist_metamathqa   train: MetaMathQA-395K.json | MetaMathQA-synthetic.json
  optconsist_gsm8k        train: train.jsonl | gsm8k_train.jsonl,
                          test: test.jsonl | gsm8k_test.jsonl
  optconsist_hellaswag    validation: hellaswag_val.jsonl
  optconsist_arc          test: ARC-Challenge-Test.jsonl | arc_challenge_test.jsonl
  optconsist_winogrande   validation: dev.jsonl | winogrande_val.jsonl

Build: `python -m optconsist_jax.data.tfds_builders NAME MANUAL_DIR DATA_DIR`.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
  # `python -m`: run the importable module's main, so the builders are
  # `optconsist_jax.data.tfds_builders` classes (tfds locates a builder's
  # files through its module, which `__main__` is not), registered once.
  from optconsist_jax.data import tfds_builders as _module  # pylint: disable=g-import-not-at-top
  _module.main(sys.argv[1:])
  sys.exit(0)

import numpy as np
import tensorflow_datasets as tfds

from optconsist_jax import paths
from optconsist_jax.data import formats
from optconsist_jax.data.records import MathExample, MultipleChoice


def _math_features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "query": tfds.features.Text(), "response": tfds.features.Text(),
      "answer": tfds.features.Text(), "type": tfds.features.Text(),
      "original_question": tfds.features.Text(),
  })


def _choice_features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "contexts": tfds.features.Sequence(tfds.features.Text()),
      "continuations": tfds.features.Sequence(tfds.features.Text()),
      "choices": tfds.features.Sequence(tfds.features.Text()),
      "label": np.int32, "benchmark": tfds.features.Text(),
      "id": tfds.features.Text(),
  })


class _LocalFilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Reads `FILES[split]` (the first name present) from the manual dir."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "From local files via optconsist_jax readers.",
                   "1.1.0": "Multiple-choice records keep their choices"
                            " (the strings acc_norm is normalized by)."}
  FILES: dict[str, str | tuple[str, ...]] = {}
  READER = None
  KIND = "math"

  def __init__(self, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  @property
  def MANUAL_DOWNLOAD_INSTRUCTIONS(self):  # pylint: disable=invalid-name
    return ("Put " + ", ".join(f"{' or '.join(_names(f))} ({s})"
                               for s, f in self.FILES.items())
            + " into the manual directory.")

  def _info(self) -> tfds.core.DatasetInfo:
    features = _math_features() if self.KIND == "math" else _choice_features()
    # File order kept, so tfds records equal the reader's list index by index.
    return self.dataset_info_from_configs(features=features,
                                          disable_shuffling=True)

  def _split_generators(self, dl_manager):
    manual = os.fspath(dl_manager.manual_dir)
    splits = {}
    for split, names in self.FILES.items():
      present = [n for n in _names(names)
                 if os.path.isfile(os.path.join(manual, n))]
      if present:
        splits[split] = self._generate_examples(
            os.path.join(manual, present[0]))
    if not splits:
      raise FileNotFoundError(
          f"{self.name}: none of"
          f" {[n for f in self.FILES.values() for n in _names(f)]} in {manual}")
    return splits

  def _generate_examples(self, path):
    reader = type(self).READER
    for i, rec in enumerate(reader(path)):
      if isinstance(rec, MathExample):
        yield i, {"query": rec.query, "response": rec.response,
                  "answer": rec.answer, "type": rec.type,
                  "original_question": rec.original_question}
      else:
        yield i, {"contexts": list(rec.contexts),
                  "continuations": list(rec.continuations),
                  "choices": list(rec.choices),
                  "label": rec.label, "benchmark": rec.benchmark, "id": rec.id}


def _names(files: str | tuple[str, ...]) -> tuple[str, ...]:
  return (files,) if isinstance(files, str) else files


class OptconsistMetamathqa(_LocalFilesBuilder):
  FILES = {"train": ("MetaMathQA-395K.json", "MetaMathQA-synthetic.json")}
  READER = staticmethod(formats.read_metamathqa)


class OptconsistGsm8k(_LocalFilesBuilder):
  FILES = {"train": ("train.jsonl", "gsm8k_train.jsonl"),
           "test": ("test.jsonl", "gsm8k_test.jsonl")}
  READER = staticmethod(formats.read_gsm8k)


class OptconsistHellaswag(_LocalFilesBuilder):
  FILES = {"validation": ("hellaswag_val.jsonl",)}
  READER = staticmethod(formats.read_hellaswag)
  KIND = "choice"


class OptconsistArc(_LocalFilesBuilder):
  FILES = {"test": ("ARC-Challenge-Test.jsonl", "arc_challenge_test.jsonl")}
  READER = staticmethod(formats.read_arc)
  KIND = "choice"


class OptconsistWinogrande(_LocalFilesBuilder):
  FILES = {"validation": ("dev.jsonl", "winogrande_val.jsonl")}
  READER = staticmethod(formats.read_winogrande)
  KIND = "choice"


BUILDERS = {
    "metamathqa": OptconsistMetamathqa,
    "gsm8k": OptconsistGsm8k,
    "hellaswag": OptconsistHellaswag,
    "arc": OptconsistArc,
    "arc_challenge": OptconsistArc,
    "winogrande": OptconsistWinogrande,
}


def _builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  if name not in BUILDERS:
    raise ValueError(f"no tfds builder {name!r}; known: {sorted(BUILDERS)}")
  return BUILDERS[name](data_dir=data_dir)


def build(name: str, manual_dir: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """Builds dataset `name` from the files in `manual_dir` into `data_dir`."""
  builder = _builder(name, data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir))
  return builder


def data_source(name: str, split: str, data_dir: str):
  """The random-access array_record source (grain.MapDataset.source takes it)."""
  builder = _builder(name, data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"tfds dataset {builder.name} is not built in {data_dir}; run"
        f" `python -m optconsist_jax.data.tfds_builders {name} MANUAL_DIR"
        f" {data_dir}`")
  if split not in builder.info.splits:
    raise ValueError(f"{builder.name} in {data_dir} has splits"
                     f" {list(builder.info.splits)}, not {split!r}")
  return builder.as_data_source(split=split)


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def to_record(example: dict) -> MathExample | MultipleChoice:
  """A decoded tfds example -> the record formats.py would have produced."""
  if "query" in example:
    return MathExample(query=_text(example["query"]),
                       response=_text(example["response"]),
                       answer=_text(example["answer"]),
                       type=_text(example["type"]),
                       original_question=_text(example["original_question"]))
  return MultipleChoice(
      contexts=tuple(_text(c) for c in example["contexts"]),
      continuations=tuple(_text(c) for c in example["continuations"]),
      choices=tuple(_text(c) for c in example["choices"]),
      label=int(example["label"]), benchmark=_text(example["benchmark"]),
      id=_text(example["id"]))


def read(name: str, split: str, data_dir: str
         ) -> list[MathExample] | list[MultipleChoice]:
  """All records of a built split, in file order."""
  source = data_source(name, split, data_dir)
  out = [to_record(source[i]) for i in range(len(source))]
  if not out:
    raise ValueError(f"tfds {name}/{split} in {data_dir}: empty dataset")
  return out


def main(argv: list[str]) -> None:
  if len(argv) != 3:
    sys.exit("usage: python -m optconsist_jax.data.tfds_builders NAME"
             " MANUAL_DIR DATA_DIR")
  name, manual_dir, data_dir = argv
  builder = build(name, paths.resolve(manual_dir), paths.resolve(data_dir))
  print(builder.info)
  print(f"{builder.name}: splits {sorted(builder.info.splits)} written to"
        f" {builder.data_dir}", flush=True)

