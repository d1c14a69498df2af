"""Answer extraction (MetaMath rule, GSM8K strict match) and prompts."""

from flax import nnx
import numpy as np
import pytest

from optconsist_jax.model import generate as gen
from optconsist_jax.data.records import MathExample
from optconsist_jax.evaluate import math as mm
from optconsist_jax.model import Llama, preset


@pytest.mark.parametrize("completion, want", [
    ("So 3 + 4 = 7. The answer is: 7", 7.0),
    ("The answer is: 1,000", 1000.0),
    ("The answer is: 1,234,567.", 1234567.0),
    ("The answer is: -12", -12.0),
    ("The answer is: \u221212", -12.0),  # Unicode minus.
    ("The answer is: 3.75", 3.75),
    ("The answer is: .5", 0.5),
    ("The answer is: 3/4", 0.75),
    ("The answer is: -3/4", -0.75),
    ("The answer is: \\frac{3}{4}", 0.75),
    ("The answer is: -\\dfrac{1}{8}", -0.125),
    ("The answer is: $18.", 18.0),
    ("The answer is: 50%", 50.0),
    ("The answer is: x = 5 apples and 6 pears", 5.0),
    # The LAST phrase counts, not the first.
    ("The answer is: 3. Wait, recheck. The answer is: 4", 4.0),
    ("#### 10\nThe answer is: 12", 12.0),
    # Missing phrase (or phrase without the colon and space) = no answer.
    ("The total is 42.", None),
    ("The answer is 42", None),
    ("The answer is: ", None),
    ("The answer is: forty-two", None),
    ("The answer is: 1/0", None),
])
def test_extract_answer(completion, want):
  got = mm.extract_answer(completion)
  if want is None:
    assert got is None
  else:
    assert got == pytest.approx(want)


@pytest.mark.parametrize("text, want", [
    ("48/2 = <<48/2=24>>24 clips.\n#### 72", 72.0),
    ("#### 1,000.", 1000.0),
    ("#### -5", -5.0),
    ("#### 3\nand later #### 4", 3.0),  # The first one.
    ("The answer is: 72", None),
    ("####72", None),
    ("#### .", None),
])
def test_extract_gsm8k_hash_answer(text, want):
  assert mm.extract_gsm8k_hash_answer(text) == want


def test_is_correct():
  assert mm.is_correct(72.0, mm.parse_number("72"))
  assert mm.is_correct(0.5, mm.parse_number("\\frac{1}{2}"))
  assert mm.is_correct(1000.0, mm.parse_number("1,000"))
  assert not mm.is_correct(71.0, 72.0)
  assert not mm.is_correct(None, 72.0)
  assert not mm.is_correct(72.0, None)


def test_prompts():
  p = mm.metamath_prompt("What is 2+2?")
  assert p.endswith("### Instruction:\nWhat is 2+2?\n\n### Response: Let's"
                    " think step by step.")
  shots = [MathExample("Q1?", "A1.\n#### 1", "1"),
           MathExample("Q2?", "A2.\n#### 2", "2")]
  assert mm.gsm8k_fewshot_prompt("Q3?", shots) == (
      "Question: Q1?\nAnswer: A1.\n#### 1\n\nQuestion: Q2?\nAnswer: A2.\n"
      "#### 2\n\nQuestion: Q3?\nAnswer:")
  train = [MathExample(f"q{i}", f"a{i}", str(i)) for i in range(20)]
  s1, s2 = mm.sample_shots(train, 5, seed=3), mm.sample_shots(train, 5, seed=3)
  assert s1 == s2 and len(set(s1)) == 5
  with pytest.raises(ValueError, match="train split has 20"):
    mm.sample_shots(train, 21)
  with pytest.raises(ValueError, match="unknown math protocol"):
    mm.default_generation("mmlu")


class ByteTokenizer:
  pad_id, bos_id, eos_id, vocab_size = 0, 1, 2, 128

  def encode(self, text, bos=False, eos=False):
    ids = [min(ord(c), 127) for c in text]
    return [self.bos_id] * bos + ids + [self.eos_id] * eos

  def decode(self, ids):
    return "".join(chr(i) for i in ids if i >= 3)


def test_accuracy_scores_what_generation_produced():
  model = Llama(preset("tiny_mha").replace(initializer_range=0.3),
                rngs=nnx.Rngs(1))
  tok = ByteTokenizer()
  examples = [MathExample("1+1?", "", "2"), MathExample("2+2?", "", "4")]
  config = gen.GenerationConfig(max_new_tokens=6, prompt_bucket=8)
  out = mm.accuracy(model, tok, examples, "metamath", generation=config)
  raw = gen.generate(model, tok, [mm.metamath_prompt(e.query)
                                  for e in examples], config)
  assert [p["completion"] for p in out.predictions] == raw.completions
  # A random model does not write "The answer is: ", so nothing is correct.
  assert [p["pred"] for p in out.predictions] == [
      mm.extract_answer(c) for c in raw.completions]
  assert out.total == 2 and out.accuracy == out.correct / 2


@pytest.mark.parametrize("protocol, completions, want", [
    ("metamath", ["so The answer is: 2", "The answer is: 5"], [True, False]),
    ("gsm8k_fewshot", [" 1+1=2\n#### 2", " The answer is: 4"], [True, False]),
])
def test_accuracy_scoring(monkeypatch, protocol, completions, want):
  seen = {}

  def fake_generate(model, tokenizer, texts, config):
    seen["texts"], seen["config"] = texts, config
    return gen.GenerationResult(list(completions), [3, 3], 1.0)

  monkeypatch.setattr(gen, "generate", fake_generate)
  examples = [MathExample("1+1?", "", "2"), MathExample("2+2?", "", "4")]
  shots = [MathExample("Q?", "A.\n#### 7", "7")]
  out = mm.accuracy(None, ByteTokenizer(), examples, protocol, shots=shots)
  assert [p["correct"] for p in out.predictions] == want
  assert out.accuracy == 0.5 and out.tokens_per_second == 6.0
  if protocol == "gsm8k_fewshot":
    assert seen["texts"][0].startswith("Question: Q?\nAnswer: A.\n#### 7\n\n")
    assert "Question:" in seen["config"].stop_strings
  else:
    assert seen["texts"][1] == mm.metamath_prompt("2+2?")
    assert seen["config"].max_new_tokens == 512


def test_response_loss_equals_numpy_from_full_logits():
  """Held-out finetuning loss = brute-force log-softmax over full sequences."""
  from optconsist_jax.data import supervised  # pylint: disable=g-import-not-at-top
  from optconsist_jax.data.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  tok = Tokenizer.tiny()
  model = Llama(preset("tiny_gqa").replace(vocab_size=tok.vocab_size),
                rngs=nnx.Rngs(0))
  examples = [MathExample(query="Ava has 3 apples and buys 4. How many?",
                          response="3 + 4 = 7.\nThe answer is: 7", answer="7"),
              MathExample(query="What is 12 - 5?",
                          response="12 - 5 = 7.\n#### 7\nThe answer is: 7",
                          answer="7")]
  got = mm.response_loss(model, tok, examples, batch_size=4)
  total, count = 0.0, 0
  for e in examples:
    ex = supervised.tokenize_supervised(e, tok, 512)
    tokens = np.asarray(ex.tokens)
    logits = np.asarray(model(tokens[None, :-1])[0], np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
        -1, keepdims=True)) - logits.max(-1, keepdims=True)
    for i in range(1, len(tokens)):
      if ex.loss_mask[i]:
        total -= logp[i - 1, tokens[i]]
        count += 1
  assert got.tokens == count
  np.testing.assert_allclose(got.loss, total / count, rtol=1e-5)
