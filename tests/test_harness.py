"""lm-evaluation-harness itself vs the built-in scorer, item by item.

The real harness (`lm_eval.simple_evaluate`, lm-eval 0.4.13, the `harness`
extra) runs offline on local-file task YAMLs that `include` the harness's own
hellaswag, arc_challenge, winogrande and gsm8k tasks (their prompts,
`process_docs`, choices, filters and metrics) and point `dataset_path: json`
at items written here in the published formats (the project's synthetic
generator). The model behind it is `evals.harness.HarnessLM` on a tiny random
Llama; the built-in scorer reads the same files with data/formats.py. Both
must give the same per-choice log-likelihoods, the same acc / acc_norm per
item and the same GSM8K prompts, completions and exact match. The adapter's
rolling log-likelihood is checked against a numpy brute force, and a sharded
run against an unsharded one.
"""

import json
import os

from flax import nnx
import jax
import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

from optconsist_jax.evaluate import watch as ev_lib  # pylint: disable=g-import-not-at-top
from optconsist_jax.evaluate.config import EvalConfig  # pylint: disable=g-import-not-at-top
from optconsist_jax.evaluate import config as eval_config  # pylint: disable=g-import-not-at-top
from optconsist_jax.evaluate import suite  # pylint: disable=g-import-not-at-top
from optconsist_jax.model import generate as gen  # pylint: disable=g-import-not-at-top
from optconsist_jax import sharding  # pylint: disable=g-import-not-at-top
from optconsist_jax.data import formats  # pylint: disable=g-import-not-at-top
from optconsist_jax.data import synthetic  # pylint: disable=g-import-not-at-top
from optconsist_jax.data.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
from optconsist_jax.evaluate import harness  # pylint: disable=g-import-not-at-top
from optconsist_jax.evaluate import math as math_lib  # pylint: disable=g-import-not-at-top
from optconsist_jax.evaluate import multiple_choice as mc  # pylint: disable=g-import-not-at-top
from optconsist_jax.model import Llama, preset  # pylint: disable=g-import-not-at-top

N_ITEMS = 6
N_SHOTS = 2
GEN_TOKENS = 12
MODEL = preset("tiny_gqa").replace(vocab_size=2048, initializer_range=0.2)
TASKS_DIR = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")


def _jsonl(path, records):
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  return str(path)


def _arc_hf_layout(r):
  """The AI2 layout the generator writes -> allenai/ai2_arc's layout."""
  q = r["question"]
  return {"id": r["id"], "question": q["stem"],
          "choices": {"text": [c["text"] for c in q["choices"]],
                      "label": [c["label"] for c in q["choices"]]},
          "answerKey": r["answerKey"]}


def _task_yaml(path, name, base, files, extra=""):
  data_files = "\n".join(f"    {split}: {f}" for split, f in files.items())
  splits = "\n".join(
      f"{key}: {split if split in files else 'null'}" for key, split in
      (("training_split", "train"), ("validation_split", "validation"),
       ("test_split", "test")))
  path.write_text(
      f"include: {os.path.join(TASKS_DIR, base)}\n"
      f"task: {name}\ndataset_path: json\ndataset_name: null\n"
      f"dataset_kwargs:\n  data_files:\n{data_files}\n"
      f"  cache_dir: {path.parent / 'hf_cache'}\n{splits}\n{extra}")


def _arc_with_flips(model, tok, d):
  """ARC items, plus pool items on which the old acc_norm rule differs.

  Dividing by len(" " + choice) instead of len(choice) changes the pick on
  few items of a random model; those found in a pool get the new rule's pick
  as their answer key, so acc_norm is 1 under the harness's rule and 0 under
  the old one and the item-by-item comparison can tell the rules apart.
  """
  pool = [_arc_hf_layout(r) for r in synthetic.arc_records(40, 2)]
  items = formats.read_arc(_jsonl(d / "arc_pool.jsonl", pool))
  out = mc.evaluate(model, tok, items, batch_size=8, max_len=512)
  records, flips = pool[:N_ITEMS], []
  for rec, item, p in zip(pool, items, out.predictions):
    old = int(np.argmax(np.array(p["logprobs"]) /
                        [len(c) for c in item.continuations]))
    if old != p["pred_norm"] and rec not in records:
      rec = dict(rec, answerKey=rec["choices"]["label"][p["pred_norm"]])
      flips.append(len(records))
      records.append(rec)
  return records, flips


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  d = tmp_path_factory.mktemp("harness")
  model = Llama(MODEL, rngs=nnx.Rngs(0))
  tok = Tokenizer.tiny()
  arc, flips = _arc_with_flips(model, tok, d)
  data = {
      "hellaswag": _jsonl(d / "hellaswag.jsonl",
                          synthetic.hellaswag_records(N_ITEMS, 1)),
      "arc": _jsonl(d / "arc.jsonl", arc),
      "winogrande": _jsonl(d / "winogrande.jsonl",
                           synthetic.winogrande_records(N_ITEMS, 3)),
  }
  train, test = synthetic.make_splits(20, N_ITEMS, 4)
  data["gsm8k_train"] = _jsonl(d / "gsm8k_train.jsonl",
                               [synthetic.render_gsm8k(p) for p in train])
  data["gsm8k_test"] = _jsonl(d / "gsm8k_test.jsonl",
                              [synthetic.render_gsm8k(p) for p in test])
  tasks = d / "tasks"
  tasks.mkdir()
  _task_yaml(tasks / "hs.yaml", "local_hellaswag", "hellaswag/hellaswag.yaml",
             {"validation": data["hellaswag"]})
  _task_yaml(tasks / "arc.yaml", "local_arc", "arc/arc_challenge.yaml",
             {"test": data["arc"]})
  _task_yaml(tasks / "wg.yaml", "local_winogrande", "winogrande/default.yaml",
             {"validation": data["winogrande"]})
  _task_yaml(tasks / "gsm8k.yaml", "local_gsm8k", "gsm8k/gsm8k.yaml",
             {"train": data["gsm8k_train"], "test": data["gsm8k_test"]},
             f"num_fewshot: {N_SHOTS}\nfewshot_config:\n  sampler: first_n\n"
             "generation_kwargs:\n  until: ['Question:', '</s>', '<|im_end|>']"
             f"\n  do_sample: false\n  temperature: 0.0\n"
             f"  max_gen_toks: {GEN_TOKENS}\n")
  config = eval_config.HarnessEvalConfig(
      tasks=("local_hellaswag", "local_arc", "local_winogrande",
             "local_gsm8k"), include_path=(str(tasks),),
      include_defaults=False, batch_size=8, max_len=512)
  result = harness.evaluate_tasks(model, tok, config)
  return dict(data=data, model=model, tok=tok, result=result,
              tasks_dir=str(tasks), arc_flips=flips,
              n={"local_arc": len(arc)})


def _samples(setup, task, filt="none"):
  out = sorted((s for s in setup["result"].raw["samples"][task]
                if s["filter"] == filt), key=lambda s: s["doc_id"])
  assert len(out) == setup["n"].get(task, N_ITEMS)
  return out


@pytest.mark.parametrize("task,reader,path_key", [
    ("local_hellaswag", formats.read_hellaswag, "hellaswag"),
    ("local_arc", formats.read_arc, "arc"),
    ("local_winogrande", formats.read_winogrande, "winogrande"),
])
def test_multiple_choice_item_by_item(setup, task, reader, path_key):
  data, model, tok, result = (setup[k] for k in ("data", "model", "tok",
                                                  "result"))
  items = reader(data[path_key])
  builtin = mc.evaluate(model, tok, items, batch_size=8, max_len=512)
  assert builtin.add_bos is True  # the tiny SentencePiece model = Llama's.
  names = set()
  for item, pred, s in zip(items, builtin.predictions, _samples(setup, task)):
    harness_ll = np.array([r[0] for r in s["filtered_resps"]])
    np.testing.assert_allclose(pred["logprobs"], harness_ll, atol=1e-4,
                               rtol=0)
    # The requests themselves: the harness's (context, " " + choice).
    assert [tuple(a) for a in s["arguments"]] == list(
        zip(item.contexts, item.continuations))
    assert s["acc"] == float(pred["pred"] == item.label)
    if "acc_norm" in s:
      names.add("acc_norm")
      assert s["acc_norm"] == float(pred["pred_norm"] == item.label)
  for metric in ("acc",) + tuple(sorted(names)):
    assert result.metrics[f"harness/{task}/{metric}"] == pytest.approx(
        builtin.scores[items[0].benchmark][metric])
  assert names == ({"acc_norm"} if task != "local_winogrande" else set())


def test_acc_norm_items_tell_the_rules_apart(setup):
  """On the flip items the harness's acc_norm is 1; the old rule scores 0."""
  if not setup["arc_flips"]:
    pytest.skip("no pool item flips between the two rules with this model")
  samples = _samples(setup, "local_arc")
  items = formats.read_arc(setup["data"]["arc"])
  for i in setup["arc_flips"]:
    lls = np.array([r[0] for r in samples[i]["filtered_resps"]])
    old = int(np.argmax(lls / [len(c) for c in items[i].continuations]))
    assert samples[i]["acc_norm"] == 1.0 and old != items[i].label


def test_gsm8k_generation_item_by_item(setup):
  data, model, tok, result = (setup[k] for k in ("data", "model", "tok",
                                                  "result"))
  test = formats.read_gsm8k(data["gsm8k_test"])
  shots = formats.read_gsm8k(data["gsm8k_train"])[:N_SHOTS]  # first_n
  generation = gen.GenerationConfig(
      max_new_tokens=GEN_TOKENS,
      stop_strings=math_lib.GSM8K_FEWSHOT_STOP_STRINGS, batch_size=8,
      max_prompt_len=512 - GEN_TOKENS, add_bos=True)
  builtin = math_lib.accuracy(model, tok, test, "gsm8k_fewshot", shots=shots,
                              generation=generation)
  strict = _samples(setup, "local_gsm8k", "strict-match")
  for e, p, s in zip(test, builtin.predictions, strict):
    assert s["arguments"][0][0] == math_lib.gsm8k_fewshot_prompt(e.query,
                                                                 shots)
    assert s["resps"][0][0] == p["completion"]
    assert s["exact_match"] == float(p["correct"])
  assert any(p["completion"] for p in builtin.predictions)
  assert result.metrics["harness/local_gsm8k/exact_match/strict-match"] == (
      pytest.approx(builtin.accuracy))


def test_exact_match_rules_agree_on_written_answers():
  """The harness's strict-match filter + exact_match vs extract/is_correct."""
  from lm_eval.filters.extraction import RegexFilter  # pylint: disable=g-import-not-at-top
  from lm_eval.api.metrics import exact_match_hf_evaluate  # pylint: disable=g-import-not-at-top
  regexes = [",", "\\$", "(?s).*#### ", "\\.$"]
  flt = RegexFilter(regex_pattern="#### (\\-?[0-9\\.\\,]+)")
  gold = "She has 3 + 4 = 7 apples.\n#### 1,007"
  for completion in (" 3 + 4 = 7\n#### 1,007", " #### 1007.", " #### 107",
                     " The answer is 1007", " #### -1007", " #### 1,007\n"):
    (filtered,), = flt.apply([[completion]], [{}])
    harness_em = exact_match_hf_evaluate(
        predictions=[filtered], references=[gold], regexes_to_ignore=regexes,
        ignore_case=True)["exact_match"]
    ours = math_lib.is_correct(math_lib.extract_gsm8k_hash_answer(completion),
                               math_lib.parse_number("1,007"))
    assert bool(harness_em) == ours, completion


def _log_softmax(logits):
  m = logits.max(-1, keepdims=True)
  return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def test_rolling_loglikelihood_equals_brute_force(setup):
  model, tok = setup["model"], setup["tok"]
  text = ("Return the number of items in a container. The argument may be a"
          " sequence or a collection.")
  lm = harness.HarnessLM(model, tok, max_len=8, batch_size=4,
                         length_bucket=4)
  tokens = tok.encode(text, bos=True)
  assert len(tokens) > 16  # several windows
  windows = lm.rolling_windows(text)
  # Every token predicted once, BOS included (the HF backend's Llama rule).
  assert sum((w[1] for w in windows), []) == tokens
  want = 0.0
  for ctx, pred in windows:
    seq = (ctx + pred)[:-1]
    assert len(seq) <= 8
    logp = _log_softmax(np.asarray(jax.jit(model)(np.array([seq])),
                                   np.float64)[0])
    want += sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(pred))
  (got,) = lm.loglikelihood_rolling([(text,)])
  assert got == pytest.approx(want, abs=1e-3)


def test_sharded_batches_same_scores(setup):
  """Params on an fsdp mesh of 8 devices, rows sharded: same numbers."""
  data, model, tok = setup["data"], setup["model"], setup["tok"]
  mesh_config = sharding.MeshConfig.preset("fsdp")
  mesh = sharding.make_mesh(mesh_config)
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, sharding.state_shardings(state, mesh,
                                                         mesh_config.rules))
  sharded = nnx.merge(graphdef, state)
  items = formats.read_arc(data["arc"])
  requests = [(ctx, " " + c) for item in items
              for ctx, c in zip(item.contexts, item.choices)]
  plain = harness.HarnessLM(model, tok, batch_size=8, max_len=512)
  on_mesh = harness.HarnessLM(sharded, tok, batch_size=8, max_len=512,
                              mesh=mesh, rules=mesh_config.rules)
  a, b = plain.loglikelihood(requests), on_mesh.loglikelihood(requests)
  np.testing.assert_allclose([x[0] for x in a], [x[0] for x in b], atol=1e-4)
  assert [x[1] for x in a] == [x[1] for x in b]


def test_eval_job_records_harness_metrics(setup):
  """run_evals puts harness metrics beside the built-in ones."""
  data, model, tok = setup["data"], setup["model"], setup["tok"]
  config = EvalConfig.from_dict({
      "mesh": {"preset": "fsdp"},
      "multiple_choice": {"arc_challenge": data["arc"]},
      "harness": {"tasks": ["local_arc"], "include_path": [setup["tasks_dir"]],
                  "include_defaults": False, "batch_size": 8,
                  "max_len": 512}})
  items = [dataclasses_replace(i, "arc_challenge")
           for i in formats.read_arc(data["arc"])]
  eval_data = suite.EvalData([], [], items, [])
  metrics, predictions = suite.run_evals(model, tok, eval_data, config)
  assert metrics["harness/local_arc/acc_norm"] == pytest.approx(
      metrics["mc/arc_challenge/acc_norm"])
  assert metrics["harness/local_arc/acc"] == pytest.approx(
      metrics["mc/arc_challenge/acc"])
  assert "harness/local_arc/acc_stderr" in metrics
  assert sum(p["eval"] == "harness/local_arc"
             for p in predictions) == setup["n"]["local_arc"]
  settings = suite.eval_settings(config, tok)
  assert settings == {
      "mc_add_bos": True,
      "harness": {"version": "0.4.13", "tasks": ["local_arc"],
                  "add_bos": True, "num_fewshot": None, "limit": 0,
                  "max_len": 512}}


def dataclasses_replace(item, benchmark):
  import dataclasses  # pylint: disable=g-import-not-at-top
  return dataclasses.replace(item, benchmark=benchmark)


def test_unknown_task_is_named(setup):
  model, tok = setup["model"], setup["tok"]
  config = eval_config.HarnessEvalConfig(tasks=("no_such_task",),
                                    include_defaults=False)
  with pytest.raises(ValueError, match="no_such_task.*unknown to lm-eval"):
    harness.evaluate_tasks(model, tok, config)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  """2 processes x 4 CPU devices, params and rows sharded: same answers.

  Each process runs the adapter on the same requests (the harness's world
  size is 1); each batch's rows are spread over both processes' devices and
  the scores gathered back. Process 0's answers must equal this process's
  unsharded ones.
  """
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(__file__))
  import harness_multihost_worker as worker  # pylint: disable=g-import-not-at-top
  from worker_processes import run_workers  # pylint: disable=g-import-not-at-top

  out_json = tmp_path / "out.json"
  run_workers(worker.__file__, [out_json])
  multi = json.loads(out_json.read_text())
  single = worker.run()
  np.testing.assert_allclose([x[0] for x in multi["loglikelihood"]],
                             [x[0] for x in single["loglikelihood"]],
                             atol=1e-4)
  assert ([x[1] for x in multi["loglikelihood"]]
          == [bool(x[1]) for x in single["loglikelihood"]])
  assert len({round(x[0], 3) for x in single["loglikelihood"]}) > 1
  np.testing.assert_allclose(multi["rolling"], single["rolling"], rtol=1e-5)
  assert multi["generate"] == single["generate"]
  assert all(single["generate"])


def test_mesh_batch_size_must_split(setup):
  mesh_config = sharding.MeshConfig.preset("fsdp")
  mesh = sharding.make_mesh(mesh_config)
  lm = harness.HarnessLM(setup["model"], setup["tok"], batch_size=4,
                         mesh=mesh, rules=mesh_config.rules)
  with pytest.raises(ValueError, match="batch_size=4 is not a multiple of the"
                     " mesh's batch axes \\(8 devices\\)"):
    lm.loglikelihood([("Question: 1 + 1?\nAnswer:", " 2")])


def test_predictions_are_json(setup):
  json.dumps(setup["result"].predictions)
  kinds = {p["eval"] for p in setup["result"].predictions}
  assert kinds == {"harness/local_hellaswag", "harness/local_arc",
                   "harness/local_winogrande", "harness/local_gsm8k"}


def test_eval_job_end_to_end_harness_retention(setup, tmp_path):
  """A checkpoint's results row: harness metric as the headline retention."""
  import io  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from optconsist_jax.evaluate import results  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(__file__))
  import test_evaluate as te  # pylint: disable=g-import-not-at-top
  w = str(tmp_path / "run")
  identity = te.write_run(w)
  te.save(w, identity, 2, setup["model"], epoch_end=True)
  config = te.eval_config(
      math=dict(protocols=(), test=""),
      multiple_choice=dict(arc_challenge=setup["data"]["arc"], batch_size=8,
                           max_len=512),
      harness=dict(tasks=("local_arc",), include_path=(setup["tasks_dir"],),
                   include_defaults=False, batch_size=8, max_len=512),
      retention_metric="harness/local_arc/acc_norm")
  ev_lib.evaluate_workdir(w, config, out=io.StringIO())
  (row,) = results.read_workdir(w)
  assert row.retention == row.metrics["harness/local_arc/acc_norm"]
  assert row.metrics["harness/local_arc/acc_norm"] == pytest.approx(
      row.metrics["mc/arc_challenge/acc_norm"])
  assert row.settings["harness"]["version"] == lm_eval.__version__
  assert row.settings["mc_add_bos"] is True
  preds = [json.loads(l) for l in open(os.path.join(
      w, "eval", "predictions", "step_00000002.jsonl"))]
  assert sum(p["eval"] == "harness/local_arc" for p in preds) == (
      setup["n"]["local_arc"])
  # The row keeps the harness task's items: the report can resample them.
  acc_norm = row.items["harness/local_arc/acc_norm"]["sum"]
  assert len(acc_norm) == setup["n"]["local_arc"]
  assert sum(acc_norm) / len(acc_norm) == row.retention


def test_harness_items_make_up_its_means(setup):
  """Each mean metric's per-sample values are the row's items, in doc order.

  They average to the harness's own aggregate exactly; the report
  resamples them when a harness accuracy is the retention metric.
  """
  import dataclasses  # pylint: disable=g-import-not-at-top
  from optconsist_jax.evaluate import results  # pylint: disable=g-import-not-at-top
  from optconsist_jax.report import resample  # pylint: disable=g-import-not-at-top
  result = setup["result"]
  items = results.item_scores(result.predictions)
  # Every metric of these tasks is a mean (acc, acc_norm, exact_match);
  # their standard errors are no items.
  assert set(items) == {n for n in result.metrics
                        if not n.split("/")[2].endswith("_stderr")}
  for name, item in items.items():
    _, task, metric, *filt = name.split("/")
    samples = _samples(setup, task, *filt)
    assert item == {"sum": [float(s[metric]) for s in samples]}
    assert sum(item["sum"]) / len(item["sum"]) == result.metrics[name]
  name = "harness/local_arc/acc_norm"
  rows = [results.EvalRecord(
      step=1, epoch=1.0, method=m, base="adamw", lr=1e-4, learning=0.0,
      retention=result.metrics[name], retention_metric=name, run=m,
      items=items) for m in ("adamw", "muon")]
  sums_KN, counts_KN, _, _, k = resample.role_items(rows, "retention")
  assert k == setup["n"]["local_arc"]
  assert resample.rescore(np.ones((1, k)), sums_KN, counts_KN)[0].tolist(
      ) == [r.retention for r in rows]
  out = resample.item_resamples(rows)
  assert out.items["retention"] == (name, k)
  assert f"retention items ({k} of {name}, resampled)" in (
      resample.covers_note(rows, out, "t"))
  # Rows of an older eval job (no items): the note says why not.
  old = [dataclasses.replace(r, items={}) for r in rows]
  assert "no per-item harness/local_arc/acc_norm scores" in (
      resample.covers_note(old, resample.item_resamples(old), "t"))
