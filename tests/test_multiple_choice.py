"""Multiple-choice log-likelihood scoring against a brute-force numpy version.

And the eval job's per-question scores (the report's items) against the
accuracies they make up.
"""

import dataclasses
import re

from flax import nnx
import jax
import numpy as np
import pytest

from optconsist_jax.data.records import MultipleChoice
from optconsist_jax.evaluate import multiple_choice as mc
from optconsist_jax.evaluate import results
from optconsist_jax.evaluate import suite
from optconsist_jax.evaluate.config import EvalConfig
from optconsist_jax.evaluate.config import MC_MEAN_SCORE
from optconsist_jax.model import Llama, preset
from optconsist_jax.report import resample


class WordTokenizer:
  """Words with their leading space as one token (like BPE's "Ġword").

  So encode(a) + encode(b) != encode(a + b) in general, which is what the
  harness's joint tokenization is about. Ids are handed out on first sight.
  """

  pad_id, bos_id, eos_id, vocab_size = 0, 1, 2, 128

  def __init__(self):
    self.ids = {}

  def encode(self, text, bos=False, eos=False):
    out = []
    for piece in re.findall(r" ?\w+| ?[^\w\s]| ", text):
      if piece not in self.ids:
        self.ids[piece] = 3 + len(self.ids)
        assert self.ids[piece] < self.vocab_size
      out.append(self.ids[piece])
    return [self.bos_id] * bos + out + [self.eos_id] * eos

  def decode(self, ids):
    inv = {v: k for k, v in self.ids.items()}
    return "".join(inv.get(i, "") for i in ids)


def test_encode_pair_follows_harness():
  tok = WordTokenizer()
  ctx, cont = mc.encode_pair(tok, "The cat", " sat down")
  assert tok.decode(ctx) == "The cat" and tok.decode(cont) == " sat down"
  # Trailing spaces of the context move to the continuation: " B" is one
  # token, as in encode("Answer: B"), not "Answer: " + "B".
  ctx, cont = mc.encode_pair(tok, "Answer: ", "B")
  assert tok.decode(ctx) == "Answer:" and cont == tok.encode(" B")
  # Empty context -> BOS; add_bos -> BOS in front of every context.
  ctx, cont = mc.encode_pair(tok, "", " hi")
  assert ctx == [tok.bos_id] and cont == tok.encode(" hi")
  ctx, _ = mc.encode_pair(tok, "The cat", " sat", add_bos=True)
  assert ctx == [tok.bos_id] + tok.encode("The cat")
  # A merge across the boundary is split at the context's token length.
  ctx, cont = mc.encode_pair(tok, "The ca", "t sat")
  whole = tok.encode("The cat sat")
  assert ctx + cont == whole and len(ctx) == len(tok.encode("The ca"))


def brute_force(model, ctx, cont):
  """sum log p(cont | ctx) from one unpadded full-sequence forward."""
  tokens = np.array([ctx + cont], np.int32)
  logits = np.asarray(jax.jit(model)(tokens), np.float64)[0]
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
      -1, keepdims=True)) - logits.max(-1, keepdims=True)
  n = len(ctx)
  return sum(logp[n - 1 + j, tok] for j, tok in enumerate(cont))


ITEMS = [
    MultipleChoice(("Roof: The man climbs the ladder and",) * 4,
                   (" fixes the roof.", " eats a sandwich quickly.", " sleeps.",
                    " paints the fence , then goes home ."), 0, "hellaswag",
                   "h0", choices=("fixes the roof.", "eats a sandwich quickly.",
                                  "sleeps.",
                                  "paints the fence , then goes home .")),
    MultipleChoice(("Question: What melts ice?\nAnswer:",) * 3,
                   (" heat", " cold air", " a rock"), 0, "arc_challenge",
                   "a0", choices=("heat", "cold air", "a rock")),
    MultipleChoice(("Question: Which is a planet?\nAnswer: ",) * 2,
                   ("Mars", "the moon"), 0, "arc_challenge", "a1",
                   choices=("Mars", "the moon")),
    # WinoGrande partial scoring: two contexts, one continuation; the
    # harness's choices are the contexts.
    MultipleChoice(("The trophy did not fit in the suitcase because the trophy",
                    "The trophy did not fit in the suitcase because the"
                    " suitcase"), (" was too big.",) * 2, 0, "winogrande",
                   "w0", choices=(
                       "The trophy did not fit in the suitcase because the"
                       " trophy", "The trophy did not fit in the suitcase"
                       " because the suitcase")),
]


@pytest.fixture(scope="module")
def model():
  return Llama(preset("tiny_gqa").replace(initializer_range=0.2),
               rngs=nnx.Rngs(3))


def test_scores_equal_brute_force(model):
  tok = WordTokenizer()
  out = mc.evaluate(model, tok, ITEMS, batch_size=3, add_bos=False)
  assert out.add_bos is False
  correct = {}
  for item, pred in zip(ITEMS, out.predictions):
    want = np.array([brute_force(model, *mc.encode_pair(tok, c, k))
                     for c, k in zip(item.contexts, item.continuations)])
    np.testing.assert_allclose(pred["logprobs"], want, rtol=1e-5, atol=1e-4)
    assert pred["pred"] == int(np.argmax(want))
    # acc_norm: characters of the choice, without the target delimiter.
    chars = np.array([len(c) for c in item.choices])
    assert pred["pred_norm"] == int(np.argmax(want / chars))
    assert (pred["benchmark"], pred["id"]) == (item.benchmark, item.id)
    c = correct.setdefault(item.benchmark, [0, 0, 0])
    c[0] += int(np.argmax(want)) == item.label
    c[1] += int(np.argmax(want / chars)) == item.label
    c[2] += 1
  for bench, (acc, acc_norm, n) in correct.items():
    got = dict(out.scores[bench])
    # ASCII choices: bytes = characters.
    assert got.pop("acc_bytes") == got["acc_norm"]
    assert got == {"acc": acc / n, "acc_norm": acc_norm / n, "n": n}
  # Choices of one item differ, so the test discriminates between them.
  assert len(set(out.predictions[0]["logprobs"])) == 4


def test_acc_norm_issue_case():
  """The harness divides by len(choice), not len(" " + choice).

  Log-likelihoods and choice lengths from the issue: the harness picks
  choice 2 (-200.841 / 53 = -3.789 beats -25.531 / 6 = -4.255); dividing by
  the lengths plus one delimiter picks 3 (-25.531 / 7 = -3.647).
  """
  lls = [-139.913, -18.909, -200.841, -25.531]
  choices = ["x" * 36, "x" * 3, "x" * 53, "x" * 6]
  _, pred_norm, pred_bytes = mc.predict(lls, choices)
  assert pred_norm == 2 and pred_bytes == 2
  assert int(np.argmax(np.array(lls) / [37, 4, 54, 7])) == 3
  # Bytes differ from characters once a choice is not ASCII: 4 "é" = 8 bytes.
  _, pred_norm, pred_bytes = mc.predict([-4.0, -4.5], ["é" * 4, "abcd"])
  assert (pred_norm, pred_bytes) == (0, 0)
  _, pred_norm, pred_bytes = mc.predict([-4.4, -4.5], ["éé", "abcd"])
  assert (pred_norm, pred_bytes) == (1, 0)


def test_bos_default_follows_the_tokenizer(model):
  """Llama's tokenizer adds BOS (harness >= 0.4.9.2), GPT-2's does not."""
  from optconsist_jax.data import gpt2_bpe, tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  assert mc.harness_add_bos(tok_lib.Tokenizer.tiny()) is True
  assert gpt2_bpe.GPT2BPETokenizer.add_bos_default is False
  with pytest.raises(TypeError, match="add_bos_default"):
    mc.harness_add_bos(WordTokenizer())
  tok = WordTokenizer()
  tok.add_bos_default = True
  out = mc.evaluate(model, tok, ITEMS[:1], batch_size=4)
  want = [brute_force(model, [tok.bos_id] + tok.encode(ITEMS[0].contexts[0]),
                      tok.encode(ITEMS[0].contexts[0] + k)[
                          len(tok.encode(ITEMS[0].contexts[0])):])
          for k in ITEMS[0].continuations]
  assert out.add_bos is True
  np.testing.assert_allclose(out.predictions[0]["logprobs"], want, rtol=1e-5,
                             atol=1e-4)


def test_is_greedy_matches_argmax(model):
  tok = WordTokenizer()
  ctx = tok.encode("The man climbs")
  tokens = np.array([ctx], np.int32)
  logits = np.asarray(jax.jit(model)(tokens))[0]
  nxt = int(np.argmax(logits[-1]))
  other = (nxt + 1) % tok.vocab_size
  ll, greedy = mc.score_requests(model, [(ctx, [nxt]), (ctx, [other])],
                                 batch_size=2)
  assert greedy.tolist() == [True, False]
  assert ll[0] > ll[1]


def test_left_truncation(model):
  tok = WordTokenizer()
  ctx, cont = mc.encode_pair(tok, "a b c d e f g h i j", " k l")
  got = mc.score_continuations(model, [(ctx, cont)], max_len=6,
                               length_bucket=4)
  full = ctx + cont
  kept = full[-7:]
  want = brute_force(model, kept[:len(kept) - len(cont)], cont)
  np.testing.assert_allclose(got, [want], rtol=1e-5, atol=1e-4)


def test_empty_context_is_an_error(model):
  with pytest.raises(ValueError, match="request 0: empty context"):
    mc.score_continuations(model, [([], [5])])


# Held-out LM loss (the other retention metric), same brute-force reference.
def test_lm_loss_equals_brute_force(model):
  from optconsist_jax.evaluate import lm_loss  # pylint: disable=g-import-not-at-top
  tok = WordTokenizer()
  docs = ["the cat sat on the mat .", "a b c d e f g h i j k l m n o p q",
          "hello"]
  max_len = 6
  got = lm_loss.evaluate(model, tok, docs, max_len=max_len, batch_size=2,
                         length_bucket=4)
  nll, n = 0.0, 0
  for doc in docs:
    ids = tok.encode(doc, bos=True, eos=True)
    for start in range(0, len(ids) - 1, max_len):
      chunk = ids[start:start + max_len + 1]
      # log p of chunk[1:] given the window: context chunk[:1], cont rest.
      nll -= brute_force(model, chunk[:1], chunk[1:])
      n += len(chunk) - 1
  assert n == sum(len(tok.encode(d)) + 1 for d in docs)
  assert got.tokens == n
  np.testing.assert_allclose(got.loss, nll / n, rtol=1e-5)
  np.testing.assert_allclose(got.perplexity, np.exp(nll / n), rtol=1e-5)


def test_scorers_never_exceed_the_model_context(model):
  """max_len above the model's context is cut to it (RoPE: same weights)."""
  from optconsist_jax.evaluate import lm_loss  # pylint: disable=g-import-not-at-top
  short = nnx.merge(*nnx.split(model))
  short.config = model.config.replace(max_position_embeddings=6)
  tok = WordTokenizer()
  docs = ["a b c d e f g h i j k l m n o p q", "the cat sat on the mat ."]
  got = lm_loss.evaluate(short, tok, docs, max_len=1024, length_bucket=4)
  want = lm_loss.evaluate(model, tok, docs, max_len=6, length_bucket=4)
  assert got == want
  ctx, cont = mc.encode_pair(tok, "a b c d e f g h i j", " k l")
  got = mc.score_continuations(short, [(ctx, cont)], max_len=1024,
                               length_bucket=4)
  want = mc.score_continuations(model, [(ctx, cont)], max_len=6,
                                length_bucket=4)
  np.testing.assert_array_equal(got, want)
  assert got != mc.score_continuations(model, [(ctx, cont)], max_len=1024,
                                       length_bucket=4)


def test_item_scores_make_up_the_accuracies(model, tmp_path):
  """The eval job's per-item scores average to its accuracies exactly.

  Two items whose choices tie (the same continuation twice) check the tie
  rule: numpy's argmax, the first of equal maxima, as `predict` and the
  harness pick. The row keeps the items through the results reader, and
  all weights 1 (`resample.rescore`) give back the recorded scores.
  """
  tie = MultipleChoice(("Question: Pick one.\nAnswer:",) * 2, (" yes",) * 2,
                       1, "arc_challenge", "tie1", choices=("yes", "yes"))
  items = ITEMS + [tie, dataclasses.replace(tie, label=0, id="tie0")]
  config = EvalConfig.from_dict({"multiple_choice": {"add_bos": False,
                                                     "batch_size": 3}})
  metrics, predictions = suite.run_evals(
      model, WordTokenizer(), suite.EvalData([], [], items, []), config)
  tied = predictions[-1]["logprobs"]
  assert tied[0] == tied[1]
  got = results.item_scores(predictions)
  divisors = {"acc": lambda c: 1.0, "acc_norm": len,
              "acc_bytes": lambda c: len(c.encode("utf-8"))}
  per_bench = {}
  for bench in ("hellaswag", "arc_challenge", "winogrande"):
    mine = [(i, p) for i, p in zip(items, predictions)
            if i.benchmark == bench]
    for score, divisor in divisors.items():
      want = [float(np.argmax(np.array(p["logprobs"]) / [
          divisor(c) for c in i.choices]) == i.label) for i, p in mine]
      assert got[f"mc/{bench}/{score}"] == {"sum": want}
      assert sum(want) / len(want) == metrics[f"mc/{bench}/{score}"]
    per_bench[bench] = metrics[f"mc/{bench}/{MC_MEAN_SCORE[bench]}"]
  # The tie: choice 0 is picked, so the item labelled 1 is wrong.
  assert got["mc/arc_challenge/acc"]["sum"][-2:] == [0.0, 1.0]
  # mc/mean: its items weigh each benchmark as the mean over them does.
  mean = got["mc/mean"]
  assert len(mean["sum"]) == len(items)
  assert sum(mean["sum"]) / sum(mean["count"]) == metrics["mc/mean"]
  assert metrics["mc/mean"] == pytest.approx(
      np.mean(list(per_bench.values())), rel=1e-15)
  # Through the results writer and reader (its validation included).
  row = results.EvalRecord(
      step=1, epoch=1.0, method="adamw", base="adamw", lr=1e-4,
      learning=0.0, retention=metrics["mc/mean"], retention_metric="mc/mean",
      metrics=metrics, items=got)
  results.write_record(tmp_path, row)
  (back,) = results.read_workdir(str(tmp_path))
  assert back.items == got
  for metric in ("mc/mean", "mc/arc_challenge/acc_norm"):
    back = dataclasses.replace(back, retention_metric=metric,
                               retention=metrics[metric])
    sums_KN, counts_KN, sign, name, k = resample.role_items([back],
                                                            "retention")
    assert (sign, name) == (1.0, metric)
    (point,) = resample.rescore(np.ones((1, k)), sums_KN, counts_KN)[0]
    assert point == metrics[metric]
