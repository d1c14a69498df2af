"""grain input pipelines: packed supervised / LM batches, sharded per process.

Shape of the pipeline (`build_pipeline`):

1. Read records (formats.py from a file, tfds_builders.py from an array_record
   tfds dataset, synthetic.py, or corpus.py) and tokenize them all once
   (supervised.py; truncation counted and logged). Optionally cached.
2. Pack sequences into rows of `seq_len` slots (`pack_rows`, seeded, fixed for
   the run), so every epoch has the same number of rows and steps:
   `steps_per_epoch = num_rows // global_batch_size` (the remainder rows of an
   epoch are skipped; a different random remainder each epoch).
3. `grain.MapDataset.range(total_steps).map(_LocalBatch)`: element k is this
   process's slice of global batch k. Epoch e = k // steps_per_epoch uses the
   row permutation `np.random.default_rng([seed, e])`; global batch k holds
   rows `perm[s*B:(s+1)*B]` (s = k % steps_per_epoch) and process p of P takes
   rows `p*B/P:(p+1)*B/P` of it. Concatenating the processes' batches in
   process order gives exactly the single-process global batch.
4. `.to_iter_dataset()` (+ `.mp_prefetch()` with `num_workers` > 0). The
   iterator is a `grain.DatasetIterator`: `get_state()`/`set_state()` hold the
   next element index, so restoring yields exactly the batches an
   uninterrupted run would have seen (restore with the same num_workers).

Worker processes: grain needs absl flags parsed; outside `app.run` this module
calls `FLAGS.mark_as_parsed()`. Scripts using workers need an
`if __name__ == "__main__":` guard.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import hashlib
import json
import os
from typing import Any

from absl import flags
from absl import logging
import grain
import numpy as np

from optconsist_jax.data import corpus
from optconsist_jax.data import formats
from optconsist_jax.data import gpt2_bpe
from optconsist_jax.data import hf_tokenizer
from optconsist_jax.data import prompts
from optconsist_jax.data.records import MathExample
from optconsist_jax.data import supervised
from optconsist_jax.data import synthetic
from optconsist_jax.data.tokenizer import Tokenizer
from optconsist_jax.io import hub
from optconsist_jax import storage
from optconsist_jax import typed_config

FORMATS = ("metamathqa", "gsm8k", "text", "synthetic", "stdlib")
SOURCES = ("file", "tfds")
# Epoch count standing in for "unbounded" (grain MapDatasets are finite).
_UNBOUNDED_EPOCHS = 1_000_000


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where training data comes from and how it is batched.

  Attributes:
    format: metamathqa | gsm8k (supervised, Alpaca prompt) | text (LM loss on
      documents of a .txt/.jsonl file) | synthetic (generated MetaMathQA
      records) | stdlib (Python standard-library docstrings, LM loss).
    path: the data file (metamathqa/gsm8k/text with source "file") or the
      tfds data_dir (source "tfds").
    source: "file" (formats.py readers) or "tfds" (built array_record
      dataset, tfds_builders.py).
    split: tfds split ("train"); stdlib split ("train"/"heldout").
    tokenizer_path: SentencePiece model, GPT-2 BPE folder, tokenizer.json
      (or a folder with one), or a Hub model repo `org/name[@revision]`
      (its tokenizer.model, else its tokenizer.json); "" = the shipped tiny
      tokenizer.
    seq_len: row length T of the batch arrays.
    global_batch_size: rows per step over all processes.
    pack: pack several examples per row (else one example per row).
    truncation: supervised.TRUNCATION_POLICIES member.
    seed: shuffling (and packing, synthetic data) seed.
    num_epochs: epochs to iterate; None = unbounded.
    num_workers: grain worker processes (0 = in-process).
    worker_buffer_size: batches each worker prefetches.
    read_threads: threads computing batches in each process.
    max_examples: keep only the first records (None = all).
    synthetic_examples: records generated for format "synthetic".
    cache_dir: where tokenized data is cached ("" = no cache).
  """

  format: str = "metamathqa"
  path: str = ""
  source: str = "file"
  split: str = "train"
  tokenizer_path: str = ""
  seq_len: int = 1024
  global_batch_size: int = 768
  pack: bool = True
  truncation: str = "truncate_right"
  seed: int = 0
  num_epochs: int | None = None
  num_workers: int = 0
  worker_buffer_size: int = 2
  read_threads: int = 1
  max_examples: int | None = None
  synthetic_examples: int = 20000
  cache_dir: str = ""

  def __post_init__(self):
    def bad(key, msg):
      raise ValueError(f"DataConfig.{key}={getattr(self, key)!r}: {msg}")
    if self.format not in FORMATS:
      bad("format", f"expected one of {FORMATS}")
    if self.source not in SOURCES:
      bad("source", f"expected one of {SOURCES}")
    if self.format in ("metamathqa", "gsm8k", "text") and not self.path:
      bad("path", f"format {self.format!r} needs a path")
    if self.seq_len < 2:
      bad("seq_len", "must be at least 2")
    if self.global_batch_size < 1:
      bad("global_batch_size", "must be positive")
    if self.truncation not in supervised.TRUNCATION_POLICIES:
      bad("truncation", f"expected one of {supervised.TRUNCATION_POLICIES}")
    if self.num_epochs is not None and self.num_epochs < 1:
      bad("num_epochs", "must be positive or None")
    if self.num_workers < 0:
      bad("num_workers", "must be >= 0")
    if self.max_examples is not None and self.max_examples < 1:
      bad("max_examples", "must be positive or None")

  @classmethod
  def from_dict(cls, d: Any) -> DataConfig:
    """From a dict or ml_collections.ConfigDict; unknown keys are an error."""
    return typed_config.from_dict(cls, d, "data config")

  def replace(self, **kw) -> DataConfig:
    return dataclasses.replace(self, **kw)


def load_tokenizer(config: DataConfig) -> Tokenizer:
  """SentencePiece file, GPT-2 BPE folder (vocab + merges), a tokenizer.json
  (or its folder; data/hf_tokenizer.py), or the tiny one.

  A Hub model repo (`org/name[@revision]`) means its `tokenizer.model`, or
  its tokenizer.json when it has no tokenizer.model (hub.tokenizer_file).
  """
  if not config.tokenizer_path:
    return Tokenizer.tiny()
  if gpt2_bpe.is_gpt2_bpe_dir(config.tokenizer_path):
    return gpt2_bpe.GPT2BPETokenizer.load(config.tokenizer_path)
  path = hub.tokenizer_file(config.tokenizer_path)
  if hf_tokenizer.is_hf_tokenizer_path(path):
    return hf_tokenizer.HFTokenizer.load(path)
  return Tokenizer.load(path)


def load_records(config: DataConfig) -> list[MathExample] | list[str]:
  """The records `config` names (MathExamples, or documents for LM formats)."""
  if config.format == "synthetic":
    records = [formats.parse_metamath_record("synthetic", i, r)
               for i, r in enumerate(synthetic.metamathqa_records(
                   config.synthetic_examples, config.seed))]
  elif config.format == "stdlib":
    records = corpus.python_stdlib_text(config.split)
  elif config.source == "tfds":
    # deferred: tensorflow_datasets is slow to import; tfds formats only.
    from optconsist_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top
    records = tfds_builders.read(config.format, config.split, config.path)
  else:
    records = formats.READERS[config.format](config.path)
  if config.max_examples is not None:
    records = records[:config.max_examples]
  return records


def tokenize_records(records: Sequence[MathExample] | Sequence[str],
                     tokenizer: Tokenizer, max_len: int,
                     truncation: str = "truncate_right", name: str = "data"
                     ) -> tuple[supervised.TokenStore,
                                supervised.TruncationStats]:
  """Tokenizes all records (SentencePiece's threaded batch encoder)."""
  if not records:
    raise ValueError(f"{name}: empty dataset")
  stats = supervised.TruncationStats()
  examples = []
  if isinstance(records[0], str):
    docs = tokenizer.encode_batch(records)
    for ids in docs:
      examples.extend(supervised.document_chunks(
          [tokenizer.bos_id, *ids, tokenizer.eos_id], max_len, stats))
  else:
    prompt_ids = tokenizer.encode_batch(
        [prompts.alpaca_prompt(r.query) for r in records])
    response_ids = tokenizer.encode_batch([r.response for r in records])
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
      tokens, mask = supervised.supervised_tokens(p, r, tokenizer)
      ex = supervised._finish(tokens, mask, max_len, truncation, stats,  # pylint: disable=protected-access
                              f"{name}: record {i}")
      if ex is not None:
        examples.append(ex)
  if not examples:
    raise ValueError(f"{name}: no examples left after truncation"
                     f" ({stats.report()})")
  return supervised.TokenStore.from_examples(examples), stats


def _cache_key(config: DataConfig, tokenizer: Tokenizer) -> str:
  h = hashlib.sha256()
  parts = [config.format, config.source, config.split, config.seq_len,
           config.truncation, config.max_examples, config.synthetic_examples,
           config.seed if config.format == "synthetic" else 0]
  if config.path and storage.is_file(config.path):
    st = storage.path(config.path).stat()
    parts += [config.path, st.length, st.mtime]
  else:
    parts.append(config.path)
  h.update(json.dumps(parts).encode())
  tok_path = tokenizer.path or ""
  tok_files = ([tok_path] if tok_path and storage.is_file(tok_path) else
               [storage.join(tok_path, n) for n in storage.listdir(tok_path)]
               if tok_path else [])
  for name in tok_files:
    h.update(storage.read_bytes(name))
  return h.hexdigest()[:16]


def tokenized_data(config: DataConfig, tokenizer: Tokenizer
                   ) -> tuple[supervised.TokenStore, supervised.TruncationStats]:
  """Reads and tokenizes (or loads from `config.cache_dir`)."""
  cache = ""
  if config.cache_dir:
    if storage.is_remote(config.cache_dir):
      raise ValueError(f"config.data.cache_dir={config.cache_dir!r}: the"
                       " token cache must be a local folder")
    os.makedirs(config.cache_dir, exist_ok=True)
    cache = os.path.join(config.cache_dir,
                         f"tokens_{_cache_key(config, tokenizer)}")
    if os.path.exists(cache + ".npz") and os.path.exists(cache + ".json"):
      with open(cache + ".json") as f:
        stats = supervised.TruncationStats(**json.load(f))
      return supervised.TokenStore.load(cache + ".npz"), stats
  store, stats = tokenize_records(
      load_records(config), tokenizer, config.seq_len + 1, config.truncation,
      name=config.path or config.format)
  if cache:
    store.save(cache + ".npz")
    with open(cache + ".json", "w") as f:
      json.dump(dataclasses.asdict(stats), f)
  return store, stats


class _LocalBatch:
  """Maps a step index to this process's slice of that global batch."""

  def __init__(self, store: supervised.TokenStore, rows: list[np.ndarray],
               seq_len: int, global_batch_size: int, process_index: int,
               process_count: int, steps_per_epoch: int, seed: int,
               pad_id: int):
    self.store = store
    self.row_offsets = np.concatenate(
        [[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    self.row_items = np.concatenate(rows).astype(np.int64)
    self.num_rows = len(rows)
    self.seq_len = seq_len
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.process_index = process_index
    self.steps_per_epoch = steps_per_epoch
    self.seed = seed
    self.pad_id = pad_id
    self._perm_epoch = -1
    self._perm = None

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_perm_epoch"], state["_perm"] = -1, None
    return state

  def permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._perm_epoch:
      self._perm = np.random.default_rng([self.seed, epoch]).permutation(
          self.num_rows)
      self._perm_epoch = epoch
    return self._perm

  def row_ids(self, step: int) -> np.ndarray:
    epoch, s = divmod(int(step), self.steps_per_epoch)
    start = s * self.global_batch_size + self.process_index * self.local_batch_size
    return self.permutation(epoch)[start:start + self.local_batch_size]

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    rows = [self.row_items[self.row_offsets[r]:self.row_offsets[r + 1]]
            for r in self.row_ids(step)]
    return supervised.assemble_rows(self.store, rows, self.seq_len, self.pad_id)


@dataclasses.dataclass
class DataPipeline:
  """A built pipeline; iterate it (or `iterator()`) for local batches.

  Attributes:
    dataset: grain IterDataset of this process's batches (dicts of [b, T]).
    steps_per_epoch: global steps in one epoch.
    total_steps: steps over `num_epochs` (None when unbounded).
    local_batch_size: rows per batch on this process.
    num_sequences: tokenized sequences (examples or document chunks).
    num_rows: packed rows in one pass over the data.
    stats: what the truncation policy did.
    tokenizer: the tokenizer used.
    map_dataset: the underlying MapDataset (random access by step).
  """

  config: DataConfig
  dataset: grain.IterDataset
  map_dataset: grain.MapDataset
  steps_per_epoch: int
  total_steps: int | None
  local_batch_size: int
  process_index: int
  process_count: int
  num_sequences: int
  num_rows: int
  stats: supervised.TruncationStats
  tokenizer: Tokenizer
  target_tokens_per_epoch: int

  def iterator(self) -> grain.DatasetIterator:
    return iter(self.dataset)

  def __iter__(self):
    return self.iterator()


def _ensure_flags_parsed() -> None:
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def build_pipeline(config: DataConfig, *, tokenizer: Tokenizer | None = None,
                   process_index: int | None = None,
                   process_count: int | None = None,
                   store: supervised.TokenStore | None = None) -> DataPipeline:
  """Builds the grain pipeline for `config` (module docstring).

  Args:
    config: the data config.
    tokenizer: default: `config.tokenizer_path` (or the tiny tokenizer).
    process_index: this process; default `jax.process_index()`.
    process_count: processes; default `jax.process_count()`.
    store: pre-tokenized sequences (skips reading/tokenizing).
  """
  if process_index is None or process_count is None:
    # deferred: jax for the default process index; data code runs without it.
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in"
                     f" [0, {process_count})")
  if config.global_batch_size % process_count:
    raise ValueError(f"DataConfig.global_batch_size={config.global_batch_size}"
                     f" is not divisible by process_count={process_count}")
  tokenizer = tokenizer or load_tokenizer(config)
  if store is None:
    store, stats = tokenized_data(config, tokenizer)
  else:
    stats = supervised.TruncationStats(examples=len(store), kept=len(store))
  logging.info("data %s: %s", config.path or config.format, stats.report())
  if stats.truncated or stats.dropped:
    logging.warning("data %s: %d examples truncated, %d dropped (policy %s)",
                    config.path or config.format, stats.truncated,
                    stats.dropped, config.truncation)
  rows = supervised.pack_rows(store.lengths, config.seq_len, pack=config.pack,
                              seed=config.seed)
  steps_per_epoch = len(rows) // config.global_batch_size
  if steps_per_epoch == 0:
    raise ValueError(
        f"data {config.path or config.format}: {len(rows)} rows of"
        f" {config.seq_len} tokens is less than one global batch of"
        f" {config.global_batch_size}")
  slots = (store.lengths - 1).sum()
  logging.info("data: %d sequences in %d rows (fill %.1f%%), %d steps/epoch",
               len(store), len(rows), 100 * slots / (len(rows) * config.seq_len),
               steps_per_epoch)
  epochs = config.num_epochs or _UNBOUNDED_EPOCHS
  total = steps_per_epoch * epochs
  fn = _LocalBatch(store, rows, config.seq_len, config.global_batch_size,
                   process_index, process_count, steps_per_epoch, config.seed,
                   tokenizer.pad_id)
  map_ds = grain.MapDataset.range(total).map(fn)
  ds = map_ds.to_iter_dataset(grain.ReadOptions(
      num_threads=config.read_threads, prefetch_buffer_size=max(
          2 * config.read_threads, 1)))
  if config.num_workers > 0:
    _ensure_flags_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=config.num_workers,
        per_worker_buffer_size=config.worker_buffer_size))
  return DataPipeline(
      config=config, dataset=ds, map_dataset=map_ds,
      steps_per_epoch=steps_per_epoch,
      total_steps=total if config.num_epochs else None,
      local_batch_size=config.global_batch_size // process_count,
      process_index=process_index, process_count=process_count,
      num_sequences=len(store), num_rows=len(rows), stats=stats,
      tokenizer=tokenizer,
      target_tokens_per_epoch=int(store.loss_mask.sum()))
