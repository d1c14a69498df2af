"""Memorization experiment: data properties, scoring, a miniature resumable run."""

import dataclasses
import json
import os
import re
import subprocess
import sys

from flax import nnx
import numpy as np
import pytest

from optconsist_jax.train import config as config_types
from optconsist_jax.experiments import memorization
from optconsist_jax.experiments import memorization_data
from optconsist_jax.experiments import memorization_report
from optconsist_jax.train import population
from optconsist_jax import train as train_lib
from optconsist_jax.data import formats
from optconsist_jax.data import synthetic
from optconsist_jax.data.tokenizer import Tokenizer
from optconsist_jax.model import Llama
from optconsist_jax.model import preset


def _load(path):
  with open(path) as f:
    return json.load(f)


def _answer(r):
  return int(r["response"].rsplit("The answer is: ", 1)[1])


def _recompute(question):
  """The answer of a level-1 word problem, read from its wording alone."""
  a, b = (int(x) for x in re.findall(r"\d+", question))
  if "buys" in question and "more" in question:
    return a + b
  if "gave" in question:
    return a - b
  if "Each box holds" in question:
    return a * b
  raise AssertionError(f"unknown template: {question}")


def test_dataset_properties(tmp_path):
  data = memorization_data.make_dataset(tmp_path, seed=3, n_rule=120, n_fact=80,
                                   n_heldout=40)
  train, facts, heldout = (_load(data.train), _load(data.facts),
                           _load(data.heldout_rule))
  assert len(train) == 200 and len(facts) == 80 and len(heldout) == 40
  rules = [r for r in train if r["kind"] == "rule"]
  assert len(rules) == 120
  # Facts: all in the training set, unique names and unique answers that do
  # not occur in the question, so they can only be memorized.
  train_q = {r["query"] for r in train}
  assert all(f["query"] in train_q for f in facts)
  assert len({f["query"] for f in facts}) == 80
  answers = [_answer(f) for f in facts]
  assert len(set(answers)) == 80
  assert all(str(a) not in f["query"] for a, f in zip(answers, facts))
  assert all(re.search(r"\d", f["query"]) is None for f in facts)
  # Different seeds: different associations.
  other = _load(memorization_data.make_dataset(tmp_path / "o", seed=4, n_rule=10,
                                          n_fact=80, n_heldout=5).facts)
  assert [_answer(f) for f in other] != answers
  # Rule items: the answer follows from the question; responses verified.
  for r in rules + heldout:
    assert _answer(r) == _recompute(r["query"])
    synthetic.verify_response(r["response"], _answer(r))
  # Held out: new questions and arithmetic never seen in training.
  def arith(q):
    op = ("*" if "Each box holds" in q else "-" if "gave" in q else "+")
    return tuple(re.findall(r"\d+", q)), op
  assert not {r["query"] for r in heldout} & train_q
  assert not {arith(r["query"]) for r in heldout} & {
      arith(r["query"]) for r in rules}
  # The trainer's reader accepts the files (MetaMathQA format).
  assert len(formats.read_metamathqa(data.train)) == 200
  # Deterministic, and kept when asked again with the same arguments.
  mtime = os.path.getmtime(data.train)
  again = memorization_data.make_dataset(tmp_path, seed=3, n_rule=120, n_fact=80,
                                    n_heldout=40)
  assert again == data and os.path.getmtime(data.train) == mtime
  fresh = memorization_data.make_dataset(tmp_path / "f", seed=3, n_rule=120,
                                    n_fact=80, n_heldout=40)
  assert _load(fresh.train) == train


def _tiny_model(seed=0):
  config = preset("tiny_gqa").replace(vocab_size=2048,
                                      max_position_embeddings=256)
  return Llama(config, rngs=nnx.Rngs(seed))


def test_evaluate_on_a_random_model(tmp_path):
  data = memorization_data.make_dataset(tmp_path, n_rule=8, n_fact=6, n_heldout=5)
  facts = formats.read_metamathqa(data.facts)
  heldout = formats.read_metamathqa(data.heldout_rule)
  tok = Tokenizer.tiny()
  model = _tiny_model()
  m = memorization.evaluate(model, tok, facts, heldout, max_new_tokens=8,
                            batch_size=4)
  assert m["n_fact"] == 6 and m["n_rule"] == 5
  for k in ("memorization_acc", "rule_acc"):
    assert 0.0 <= m[k] <= 1.0
  # A random model assigns about 1/V to each token: mean log-prob near
  # -ln(2048) and well below 0.
  for k in ("memorization_logprob", "rule_logprob"):
    assert -2 * np.log(2048) < m[k] < -0.5 * np.log(2048)
  # The answer score is the sum over the number's tokens and EOS.
  assert m["memorization_answer_logprob"] < m["memorization_logprob"]
  # A random model has memorized nothing: its contrastive score is near 0
  # while the number's own log-prob is far below (about -4 ln 2048).
  assert abs(m["memorization_contrastive"]) < 0.5
  assert m["memorization_answer_logprob"] < -10
  # gold_logprobs agrees with the model's own per-token log-softmax.
  e = facts[0]
  lp = memorization.gold_logprobs(model, tok, [e])[0]
  from optconsist_jax.data import prompts
  ctx = [tok.bos_id, *tok.encode(prompts.alpaca_prompt(e.query))]
  cont = [*tok.encode(e.response), tok.eos_id]
  seq = np.asarray([ctx + cont], np.int32)
  logits = np.asarray(model(seq[:, :-1]), np.float64)[0]
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + (
      logits.max(-1))
  ll = logits[np.arange(len(logits)), seq[0, 1:]] - logz
  assert lp == pytest.approx(ll[len(ctx) - 1:].mean(), rel=1e-4)


def test_a_planted_fact_is_answered_and_an_unseen_one_is_not():
  """Train a tiny model on one fact: evaluate() must find exactly that one."""
  import jax
  import jax.numpy as jnp
  import optax
  from optconsist_jax.data import prompts
  tok = Tokenizer.tiny()
  planted, unseen = [formats.parse_metamath_record("facts", i, r) for i, r in
                     enumerate(memorization_data.fact_records(2, seed=5))]
  ctx = [tok.bos_id, *tok.encode(prompts.alpaca_prompt(planted.query))]
  cont = [*tok.encode(planted.response), tok.eos_id]
  seq = np.asarray([ctx + cont], np.int32)
  weights = np.zeros((1, seq.shape[1] - 1), np.float32)
  weights[0, len(ctx) - 1:] = 1.0  # loss on the response and EOS only
  model = _tiny_model()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adam(3e-3)

  def loss_fn(params):
    logits = nnx.merge(graphdef, params, rest)(seq[:, :-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, seq[:, 1:, None], -1)[..., 0]
    return jnp.sum(nll * weights) / jnp.sum(weights)

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  for _ in range(150):
    params, opt_state, loss = step(params, opt_state)
  assert float(loss) < 0.05
  model = nnx.merge(graphdef, params, rest)
  m = memorization.evaluate(model, tok, [planted, unseen], [unseen],
                            max_new_tokens=12, batch_size=2)
  # One of the two facts answered: exactly 1/2; the unseen one is not.
  assert m["memorization_acc"] == 0.5
  assert m["rule_acc"] == 0.0
  # The planted response is near-certain: per-token log-prob ~ -loss.
  gold = memorization.gold_logprobs(model, tok, [planted, unseen])
  assert gold[0] == pytest.approx(-float(loss), abs=0.05)
  assert gold[1] < gold[0] - 1.0
  answers = memorization.answer_logprobs(model, tok, [planted, unseen])
  assert answers[0] > -0.5 and answers[1] < answers[0] - 2.0


def _base_run(workdir):
  """A tiny random base trained for 2 steps with the real trainer."""
  c = {
      "model": dict(preset="tiny_gqa", vocab_size=2048,
                    max_position_embeddings=256),
      "mesh": dict(preset="fsdp"),
      "optim": {"groups": {"adamw": {
          "optimizer": "adamw", "kwargs": {},
          "schedule": {"kind": "constant", "peak": 1e-3}}},
                "routes": [["all", "adamw"]]},
      "data": dict(format="synthetic", synthetic_examples=32, seq_len=128,
                   global_batch_size=8),
      "train": dict(num_steps=2, stats_every=0, parameter_overview=False),
      "checkpoint": dict(every_steps=0, async_save=False),
  }
  train_lib.train(config_types.ExperimentConfig.from_dict(c), workdir)
  return workdir


def test_miniature_run_writes_results_and_resumes(tmp_path, monkeypatch):
  base = _base_run(str(tmp_path / "base"))
  settings = memorization.Settings(n_rule=24, n_fact=16, n_heldout=8,
                                   num_epochs=2, global_batch_size=8,
                                   seq_len=128, max_new_tokens=12,
                                   eval_batch_size=16, seeds=2)
  w = tmp_path / "w"
  path = memorization.run(w, base, ("adamw", "muon"), settings=settings,
                          log=lambda s: None)
  assert path == os.path.join(w, "memorization", "results.jsonl")
  with open(path) as f:
    rows = [json.loads(line) for line in f]
  assert sorted((r["optimizer"], r.get("seed"), r["epoch"]) for r in rows
                if r["optimizer"] != "base") == [
      (o, s, e) for o in ("adamw", "muon") for s in (0, 1) for e in (1, 2)]
  assert [(r["optimizer"], r["epoch"]) for r in rows
          if r["optimizer"] == "base"] == [("base", 0)]
  for r in rows:
    assert r["n_fact"] == 16 and r["n_rule"] == 8
    # Accuracies are fractions of the items (k of 16 facts, k of 8 rules).
    for key, n in (("memorization_acc", 16), ("rule_acc", 8)):
      k = r[key] * n
      assert 0 <= k <= n and k == pytest.approx(round(k)), (key, r[key])
    assert np.isfinite(r["memorization_logprob"])
  # Finetuning moved the model toward the training set: the facts' gold
  # responses got likelier than under the base.
  by = {(r["optimizer"], r.get("seed"), r["epoch"]): r for r in rows}
  for opt in ("adamw", "muon"):
    for seed in (0, 1):
      assert (by[(opt, seed, 2)]["memorization_logprob"]
              > by[("base", None, 0)]["memorization_logprob"])
  # The two seeds are two data orders: different runs.
  assert (by[("adamw", 0, 2)]["memorization_logprob"]
          != by[("adamw", 1, 2)]["memorization_logprob"])
  # The summary's gap is muon - adamw at the last epoch, paired by seed:
  # its mean is the mean of the per-seed differences (computed here from
  # the rows), its 95% t interval that of 2 samples (t_0.975,1 = 12.706).
  summary = json.loads((w / "memorization" / "summary.json").read_text())
  row = next(s for s in summary if s["metric"] == "memorization_logprob")
  assert (row["first"], row["other"], row["epoch"]) == ("adamw", "muon", 2)
  diffs = np.array([by[("muon", s, 2)]["memorization_logprob"]
                    - by[("adamw", s, 2)]["memorization_logprob"]
                    for s in (0, 1)])
  half = 12.706 * np.std(diffs, ddof=1) / np.sqrt(2)
  assert row["gap"]["mean"] == pytest.approx(diffs.mean())
  assert row["gap"]["lo"] == pytest.approx(diffs.mean() - half, rel=1e-3)
  assert row["gap"]["n"] == 2
  # Two seeds are fewer than a verdict needs (statistics.MIN_SEEDS).
  assert row["verdict"] == "no difference resolved"
  md = (w / "memorization" / "summary.md").read_text()
  assert "| memorization_answer_logprob |" in md and "muon" in md
  curves = os.path.join(w, "memorization", "curves.png")
  assert os.path.getsize(curves) > 0
  mtimes = (os.path.getmtime(path), os.path.getmtime(curves))

  # Second call: nothing is trained or evaluated again.
  def refuse(*a, **k):
    raise AssertionError("step was not skipped")
  monkeypatch.setattr(population, "train_population", refuse)
  monkeypatch.setattr(memorization, "evaluate", refuse)
  assert memorization.run(w, base, ("adamw", "muon"), settings=settings,
                          log=lambda s: None) == path
  assert (os.path.getmtime(path), os.path.getmtime(curves)) == mtimes
  # Other settings in the same workdir are refused, naming the key.
  with pytest.raises(ValueError, match="num_epochs"):
    memorization.run(w, base, ("adamw",),
                     settings=memorization.Settings(num_epochs=3))


def test_default_config_loads_from_an_installed_wheel(tmp_path):
  """The default config ships in the package: a wheel installed elsewhere
  (no checkout on sys.path, cwd elsewhere) builds it."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  wheels, target, cwd = (tmp_path / d for d in ("wheels", "site", "elsewhere"))
  cwd.mkdir()
  pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
  subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation",
                        "--no-index", "-w", str(wheels), repo],
                 check=True, cwd=cwd, timeout=120)
  (wheel,) = wheels.glob("optconsist_jax-*.whl")
  subprocess.run(pip + ["install", "--no-deps", "--no-index", "--target",
                        str(target), str(wheel)],
                 check=True, cwd=cwd, timeout=120)
  script = (
      "import optconsist_jax.experiments.memorization as m, sys\n"
      "assert m.__file__.startswith(sys.argv[1]), m.__file__\n"
      "c = m.memorization_config.get_config('muon')\n"
      "print(c.train.num_epochs, c.checkpoint.keep_epochs, c.data.format)\n")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["PYTHONPATH"] = str(target)
  out = subprocess.run([sys.executable, "-c", script,
                        str(target)], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["4", "True", "metamathqa"]


def test_contrastive_score_separates_memorizing_from_knowing_the_format(
    tmp_path):
  data = memorization_data.make_dataset(tmp_path, n_rule=4, n_fact=20,
                                        n_heldout=2)
  facts = formats.read_metamathqa(data.facts)
  tok = Tokenizer.tiny()
  requests = memorization.contrastive_requests(tok, facts, 3)
  assert len(requests) == 20 * 4
  # Each fact's own number first, then three others under its question.
  own = {(tuple(c), tuple(a)) for c, a in requests[::4]}
  assert len(own) == 20

  def context_term(ctx):  # anything that depends on the question only
    return -0.01 * (sum(ctx) % 97)

  def format_only(reqs):
    # Every 3-digit number alike, digit by digit (log 1/10 each), whatever
    # the question: the answer format learned, no fact memorized.
    return np.array([context_term(c) - (len(a) - 1) * np.log(10)
                     for c, a in reqs])

  def memorized(reqs):
    # Its own number nearly certain, any other at the format's odds.
    return np.array([context_term(c) - (0.1 if (tuple(c), tuple(a)) in own
                                        else (len(a) - 1) * np.log(10))
                     for c, a in reqs])

  fmt = memorization.contrastive_scores(None, tok, facts, n_others=5,
                                        score=format_only)
  mem = memorization.contrastive_scores(None, tok, facts, n_others=5,
                                        score=memorized)
  assert fmt == pytest.approx(np.zeros(20), abs=1e-9)
  assert np.all(mem > 6)
  # The number's own log-prob cannot tell them apart from chance: the
  # format-only model's is the 3-digit chance level, below 0.
  assert format_only(requests[::4]).mean() < -6
  with pytest.raises(ValueError, match="n_others"):
    memorization.contrastive_requests(tok, facts, 20)


def _curve_rows(optimizer, seed, lrs, delta, speed):
  """Rows over an LR grid x 4 epochs: training loss falls with lr x epoch
  (faster for larger `speed`), the score is a function of the loss plus
  `delta` (a planted optimizer effect at equal loss)."""
  rows = []
  for lr in lrs:
    for epoch in range(1, 5):
      loss = 3.0 * np.exp(-speed * lr * 1e3 * epoch) + 0.01 * seed
      rows.append({"optimizer": optimizer, "seed": seed, "lr": lr,
                   "epoch": epoch, "train_loss": loss,
                   "memorization_contrastive": 4.0 - loss + delta
                   + 0.002 * seed})
  return rows


@pytest.mark.parametrize("delta,verdict", [(0.0, "no difference resolved"),
                                           (-0.5, "muon memorizes less")])
def test_equal_loss_comparison_undoes_a_learning_rate_confound(delta,
                                                               verdict):
  lrs = (1e-3, 2e-3, 4e-3)
  rows = []
  for seed in range(3):
    rows += _curve_rows("adamw", seed, lrs, 0.0, speed=0.3)
    # Muon trains slower at the same lr: at one shared lr it is less far.
    rows += _curve_rows("muon", seed, lrs, delta + 0.01 * (seed - 1),
                        speed=0.2)
  (row,) = memorization_report.at_equal_loss(rows, ("adamw", "muon"))
  assert row["gap_mean"]["mean"] == pytest.approx(delta, abs=0.02)
  assert row["verdict"] == verdict
  assert row["loss_range"][0] < row["loss_range"][1]
  # Read at one shared lr and epoch instead, muon "memorizes less" even
  # without an effect: it only got less far.
  shared = [r for r in memorization_report.summarize(rows, ("adamw", "muon"))
            if r["metric"] == "memorization_contrastive" and r["lr"] == 2e-3]
  assert shared[0]["gap"]["mean"] < delta - 0.1


def test_a_copied_workdir_keeps_its_settings(tmp_path, monkeypatch):
  """A base inside the workdir is recorded relative to it, so a copied or
  moved workdir resumes; a settings file from before (an absolute path under
  the old location) matches too, and another base is still refused."""
  class Reached(Exception):
    pass

  def reached(*a, **k):
    raise Reached
  monkeypatch.setattr(memorization_data, "make_dataset", reached)
  settings = memorization.Settings(n_rule=24, n_fact=16, n_heldout=8)
  old = dataclasses.asdict(settings)
  old["peak_lrs"] = list(settings.peak_lrs) if settings.peak_lrs else None
  if old["peak_lrs"] is None:
    del old["peak_lrs"]
  for recorded in ("bases/b/checkpoints/9",
                   "/elsewhere/wd/bases/b/checkpoints/9"):
    w = tmp_path / ("rel" if recorded[0] != "/" else "abs")
    (w / "memorization").mkdir(parents=True)
    (w / "memorization" / memorization.SETTINGS).write_text(
        json.dumps({**old, "base": recorded}))
    with pytest.raises(Reached):
      memorization.run(w, str(w / "bases/b/checkpoints/9"), ("adamw",),
                       settings=settings, log=lambda s: None)
    with pytest.raises(ValueError, match=r"\['base'\]"):
      memorization.run(w, str(w / "bases/c/checkpoints/9"), ("adamw",),
                       settings=settings, log=lambda s: None)
