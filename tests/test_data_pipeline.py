"""grain pipelines: packing vs model loss, exact resume, per-process shards, tfds."""

import json
import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optconsist_jax.data import pipeline, supervised, synthetic
from optconsist_jax.data.tokenizer import Tokenizer
from optconsist_jax.model.loss import token_log_likelihood
from optconsist_jax.model import Llama, preset


def _id_store(n, seed=0, max_len=20):
  """Sequence i = [1, 1000 + i, filler..., 2]: its id is readable in batches."""
  rng = np.random.default_rng(seed)
  exs = []
  for i in range(n):
    filler = rng.integers(3, 999, size=int(rng.integers(0, max_len - 3)))
    toks = np.array([1, 1000 + i, *filler, 2], np.int32)
    mask = np.ones(len(toks), np.int8)
    mask[0] = 0
    exs.append(supervised.TokenizedExample(toks, mask))
  return supervised.TokenStore.from_examples(exs)


def _ids_in(batch):
  """Sequence ids of every segment in a batch (first token after BOS)."""
  out = []
  for r in range(batch["inputs"].shape[0]):
    seg = batch["segment_ids"][r]
    for s in np.unique(seg[seg > 0]):
      out.append(int(batch["inputs"][r][seg == s][1]) - 1000)
  return out


def _cfg(**kw):
  base = dict(format="synthetic", synthetic_examples=200, seq_len=64,
              global_batch_size=4, num_epochs=3, seed=7)
  base.update(kw)
  return pipeline.DataConfig(**base)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.fixture(scope="module")
def store():
  return _id_store(90)


def test_batch_contract_and_epochs(store):
  pl = pipeline.build_pipeline(_cfg(pack=False), store=store, process_index=0,
                               process_count=1, tokenizer=Tokenizer.tiny())
  assert pl.steps_per_epoch == 90 // 4 and pl.total_steps == 3 * 22
  batches = list(pl)
  assert len(batches) == pl.total_steps
  b = batches[0]
  assert {k: (v.shape, v.dtype.name) for k, v in b.items()} == {
      "inputs": ((4, 64), "int32"), "targets": ((4, 64), "int32"),
      "weights": ((4, 64), "float32"), "positions": ((4, 64), "int32"),
      "segment_ids": ((4, 64), "int32")}
  np.testing.assert_array_equal(b["targets"][:, :-1] * (b["segment_ids"][:, 1:]
                                                        == b["segment_ids"][:, :-1]),
                                b["inputs"][:, 1:] * (b["segment_ids"][:, 1:]
                                                      == b["segment_ids"][:, :-1]))
  for e in range(3):
    ids = [i for b in batches[e * 22:(e + 1) * 22] for i in _ids_in(b)]
    assert len(ids) == len(set(ids)) == 88  # Each epoch: no repeats.
  first = [_ids_in(b) for b in batches[:22]]
  second = [_ids_in(b) for b in batches[22:44]]
  assert first != second  # Reshuffled per epoch.
  assert pl.steps_per_epoch == 22


@pytest.mark.parametrize("where", ["mid_epoch", "before_edge", "at_edge",
                                   "past_edge"])
def test_resume_yields_identical_batches(store, where):
  cfg = _cfg(seq_len=24, num_epochs=4)  # Packed: about 10 steps per epoch.
  kw = dict(store=store, process_index=0, process_count=1,
            tokenizer=Tokenizer.tiny())
  pl = pipeline.build_pipeline(cfg, **kw)
  spe = pl.steps_per_epoch
  assert spe >= 6
  stop = {"mid_epoch": spe // 2, "before_edge": spe - 1, "at_edge": spe,
          "past_edge": spe + 3}[where]
  reference = _take(iter(pl), stop + 8)
  it = iter(pipeline.build_pipeline(cfg, **kw))
  _take(it, stop)
  saved = json.dumps(it.get_state())  # As the checkpoint stores it.
  del it
  restarted = iter(pipeline.build_pipeline(cfg, **kw))  # Fresh process.
  restarted.set_state(json.loads(saved))
  _same(_take(restarted, 8), reference[stop:])


def test_two_process_shards_are_disjoint_cover_and_concat_to_global(store):
  kw = dict(store=store, tokenizer=Tokenizer.tiny())
  cfg = _cfg(global_batch_size=6, num_epochs=1, pack=False)  # 15 steps.
  whole = list(pipeline.build_pipeline(cfg, process_index=0, process_count=1,
                                       **kw))
  p0 = list(pipeline.build_pipeline(cfg, process_index=0, process_count=2, **kw))
  p1 = list(pipeline.build_pipeline(cfg, process_index=1, process_count=2, **kw))
  assert len(whole) == len(p0) == len(p1) == 15
  ids0 = [i for b in p0 for i in _ids_in(b)]
  ids1 = [i for b in p1 for i in _ids_in(b)]
  assert not set(ids0) & set(ids1)
  assert sorted(ids0 + ids1) == list(range(90))
  for w, a, b in zip(whole, p0, p1):
    assert a["inputs"].shape[0] == 3
    _same([w], [{k: np.concatenate([a[k], b[k]]) for k in w}])
  with pytest.raises(ValueError, match="not divisible by process_count=4"):
    pipeline.build_pipeline(cfg, process_index=0, process_count=4, **kw)


def _per_example_loss(model, batch):
  logits = model(jnp.asarray(batch["inputs"]), jnp.asarray(batch["positions"]),
                 jnp.asarray(batch["segment_ids"]))
  nll = -np.asarray(token_log_likelihood(logits, jnp.asarray(batch["targets"])))
  out = {}
  for r in range(nll.shape[0]):
    seg = batch["segment_ids"][r]
    for s in np.unique(seg[seg > 0]):
      sel = seg == s
      key = tuple(batch["inputs"][r][sel].tolist())  # Identifies the example.
      out[key] = float((nll[r] * batch["weights"][r])[sel].sum())
  return out


def test_packed_and_unpacked_give_same_per_example_loss():
  tok = Tokenizer.tiny()
  records = [r for r in synthetic.metamathqa_records(12, seed=1)]
  from optconsist_jax.data.formats import parse_metamath_record
  recs = [parse_metamath_record("syn", i, r) for i, r in enumerate(records)]
  store, _ = pipeline.tokenize_records(recs, tok, max_len=257)
  packed_rows = supervised.pack_rows(store.lengths, 256, pack=True, seed=0)
  assert max(len(r) for r in packed_rows) >= 2  # Really packed.
  packed = supervised.assemble_rows(store, packed_rows, 256)
  single = supervised.assemble_rows(store, [[i] for i in range(len(store))], 256)
  cfg = preset("tiny_gqa").replace(vocab_size=tok.vocab_size)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  a, b = _per_example_loss(model, packed), _per_example_loss(model, single)
  assert a.keys() == b.keys() and len(a) == 12
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5)
  # And the summed loss the trainer sees is the same.
  assert np.isclose(sum(a.values()), sum(b.values()), rtol=1e-5)


def test_worker_processes_give_the_same_batches_and_resume(store):
  kw = dict(store=store, process_index=0, process_count=1,
            tokenizer=Tokenizer.tiny())
  ref = _take(iter(pipeline.build_pipeline(_cfg(seq_len=24), **kw)), 12)
  it = iter(pipeline.build_pipeline(_cfg(seq_len=24, num_workers=2), **kw))
  got = _take(it, 6)
  state = json.dumps(it.get_state())
  it.close()
  _same(got, ref[:6])
  it2 = iter(pipeline.build_pipeline(_cfg(seq_len=24, num_workers=2), **kw))
  it2.set_state(json.loads(state))
  _same(_take(it2, 6), ref[6:])
  it2.close()


def test_tfds_path_equals_plain_path(tmp_path):
  from optconsist_jax.data import tfds_builders
  manual = tmp_path / "manual"
  # The generator's output directory is a manual directory as it is.
  paths = synthetic.write_all(str(manual), n_train=120, n_test=10,
                              n_retention=5, seed=2)
  data_dir = str(tmp_path / "tfds")
  tfds_builders.build("metamathqa", str(manual), data_dir)
  plain = _cfg(format="metamathqa", path=paths["metamathqa"],
               seq_len=256, num_epochs=1)
  via_tfds = plain.replace(source="tfds", path=data_dir)
  kw = dict(process_index=0, process_count=1)
  _same(list(pipeline.build_pipeline(plain, **kw)),
        list(pipeline.build_pipeline(via_tfds, **kw)))
  tfds_builders.build("hellaswag", str(manual), data_dir)
  from optconsist_jax.data import formats
  assert tfds_builders.read("hellaswag", "validation", data_dir) == (
      formats.read_hellaswag(paths["hellaswag"]))
  with pytest.raises(ValueError, match="splits"):
    tfds_builders.read("hellaswag", "train", data_dir)


def test_config_and_small_data_errors(store, tmp_path):
  with pytest.raises(ValueError, match="DataConfig.format"):
    pipeline.DataConfig(format="csv")
  with pytest.raises(ValueError, match="DataConfig.path"):
    pipeline.DataConfig(format="gsm8k")
  with pytest.raises(ValueError, match=r"unknown keys \['batch'\]"):
    pipeline.DataConfig.from_dict({"batch": 3})
  with pytest.raises(ValueError, match="less than one global batch"):
    pipeline.build_pipeline(_cfg(global_batch_size=1000), store=store,
                            process_index=0, process_count=1)
  (tmp_path / "e.jsonl").write_text("")
  with pytest.raises(ValueError, match="empty GSM8K"):
    pipeline.build_pipeline(_cfg(format="gsm8k", path=str(tmp_path / "e.jsonl")),
                            process_index=0, process_count=1)


def test_over_long_examples_are_counted(tmp_path):
  pl = pipeline.build_pipeline(_cfg(seq_len=64, synthetic_examples=100),
                               process_index=0, process_count=1)
  s = pl.stats
  assert s.examples == 100 and s.truncated + s.dropped > 0
  assert s.kept + s.truncated + s.dropped == 100
  assert pl.num_sequences == s.kept + s.truncated
  with pytest.raises(ValueError, match="synthetic: record 0:.*max_len=65"):
    pipeline.build_pipeline(_cfg(seq_len=64, truncation="error"),
                            process_index=0, process_count=1)


def test_stdlib_corpus_is_deterministic_and_split():
  from optconsist_jax.data import corpus
  train = corpus.python_stdlib_text("train", max_docs=20)
  assert train == corpus.python_stdlib_text("train", max_docs=20)
  held = corpus.python_stdlib_text("heldout")
  assert held and not set(held) & set(corpus.python_stdlib_text("train"))


def test_gpt2_bpe_folder_is_loaded_as_gpt2_tokenizer():
  """A tokenizer_path folder with vocab.json + merges.txt selects GPT-2 BPE."""
  from optconsist_jax.data import gpt2_bpe
  folder = os.path.join(os.path.dirname(__file__), "fixtures", "nanogpt")
  config = pipeline.DataConfig(format="synthetic", tokenizer_path=folder,
                               seq_len=16, global_batch_size=2)
  tok = pipeline.load_tokenizer(config)
  assert isinstance(tok, gpt2_bpe.GPT2BPETokenizer)
  direct = gpt2_bpe.GPT2BPETokenizer.load(folder)
  assert tok.encode("hello world") == direct.encode("hello world")
