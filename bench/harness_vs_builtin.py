"""Items/s of the built-in multiple-choice scorer vs lm-evaluation-harness.

The same random-weight model and the same items (the project's synthetic
HellaSwag, ARC and WinoGrande generators, `--items` of each, in the published
formats) are scored twice:

* built-in: `data.formats` readers + `evaluate.multiple_choice.evaluate`;
* harness: `lm_eval.simple_evaluate` (lm-eval 0.4.13, the `harness` extra)
  with `evaluate.harness.HarnessLM` on local task YAMLs that include the
  harness's own hellaswag / arc_challenge / winogrande tasks
  (`dataset_path: json`, no network).

Each path runs once to compile and once timed; the timed run is reported,
with the harness's time inside the model calls (`loglikelihood`) split out
from its own overhead (task loading, request building, metrics). The two
paths must agree on acc / acc_norm (checked and recorded). The machine's load
average is recorded before and after (timings on a busy machine are noisy).

Run: .venv/bin/python bench/harness_vs_builtin.py [--preset tiny_gqa]
       [--items 50] [--batch_size 16]
Writes bench/results/harness_vs_builtin.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time

TASKS = (("hellaswag", "hellaswag/hellaswag.yaml", "validation"),
         ("arc_challenge", "arc/arc_challenge.yaml", "test"),
         ("winogrande", "winogrande/default.yaml", "validation"))


def write_data(d: str, n: int) -> dict[str, str]:
  """Synthetic items in the published layouts (ARC: allenai/ai2_arc's)."""
  from optconsist_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  arc = [{"id": r["id"], "question": r["question"]["stem"],
          "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                      "label": [c["label"] for c in r["question"]["choices"]]},
          "answerKey": r["answerKey"]} for r in synthetic.arc_records(n, 2)]
  records = {"hellaswag": synthetic.hellaswag_records(n, 1),
             "arc_challenge": arc,
             "winogrande": synthetic.winogrande_records(n, 3)}
  paths = {}
  for name, recs in records.items():
    paths[name] = os.path.join(d, f"{name}.jsonl")
    with open(paths[name], "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r) + "\n" for r in recs)
  return paths


def write_tasks(d: str, paths: dict[str, str]) -> str:
  import lm_eval  # pylint: disable=g-import-not-at-top
  tasks_dir = os.path.join(d, "tasks")
  os.makedirs(tasks_dir)
  root = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")
  for name, base, split in TASKS:
    other = [s for s in ("training_split", "validation_split", "test_split")
             if not s.startswith(split)]
    with open(os.path.join(tasks_dir, f"{name}.yaml"), "w") as f:
      f.write(f"include: {os.path.join(root, base)}\ntask: bench_{name}\n"
              "dataset_path: json\ndataset_name: null\ndataset_kwargs:\n"
              f"  data_files:\n    {split}: {paths[name]}\n"
              f"  cache_dir: {os.path.join(d, 'hf_cache')}\n"
              f"{split}_split: {split}\n"
              + "".join(f"{s}: null\n" for s in other))
  return tasks_dir


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="tiny_gqa")
  p.add_argument("--items", type=int, default=50, help="items per task")
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--max_len", type=int, default=512)
  p.add_argument("--out", default=os.path.join(
      os.path.dirname(__file__), "results", "harness_vs_builtin.json"))
  args = p.parse_args()
  load_before = os.getloadavg()

  from flax import nnx  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import lm_eval  # pylint: disable=g-import-not-at-top
  from optconsist_jax.data import formats  # pylint: disable=g-import-not-at-top
  from optconsist_jax.data.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  from optconsist_jax.evaluate import harness  # pylint: disable=g-import-not-at-top
  from optconsist_jax.evaluate import multiple_choice as mc  # pylint: disable=g-import-not-at-top
  from optconsist_jax.model import Llama, preset  # pylint: disable=g-import-not-at-top
  from optconsist_jax.model.llama import parameter_count  # pylint: disable=g-import-not-at-top

  tok = Tokenizer.tiny()
  config = preset(args.preset)
  config = config.replace(vocab_size=max(config.vocab_size, tok.vocab_size))
  model = Llama(config, rngs=nnx.Rngs(0))
  readers = {"hellaswag": formats.read_hellaswag,
             "arc_challenge": formats.read_arc,
             "winogrande": formats.read_winogrande}

  with tempfile.TemporaryDirectory() as d:
    paths = write_data(d, args.items)
    tasks_dir = write_tasks(d, paths)

    def builtin():
      items = []
      for name, read in readers.items():
        items += [dataclasses.replace(i, benchmark=name)
                  for i in read(paths[name])]
      return mc.evaluate(model, tok, items, batch_size=args.batch_size,
                         max_len=args.max_len)

    model_seconds = [0.0]

    class TimedLM(harness.HarnessLM):

      def loglikelihood(self, requests, disable_tqdm=False):
        t0 = time.perf_counter()
        out = super().loglikelihood(requests, disable_tqdm)
        model_seconds[0] += time.perf_counter() - t0
        return out

    manager = harness.task_manager((tasks_dir,), False)

    def via_harness():
      model_seconds[0] = 0.0
      lm = TimedLM(model, tok, batch_size=args.batch_size,
                   max_len=args.max_len)
      return lm_eval.simple_evaluate(
          model=lm, tasks=[f"bench_{n}" for n, _, _ in TASKS],
          task_manager=manager, log_samples=False, random_seed=0,
          numpy_random_seed=1234, torch_random_seed=None)

    timings = {}
    for name, fn in (("builtin", builtin), ("harness", via_harness)):
      t0 = time.perf_counter()
      fn()
      first = time.perf_counter() - t0
      t0 = time.perf_counter()
      out = fn()
      timings[name] = (time.perf_counter() - t0, first, out)

  n_items = args.items * len(TASKS)
  b_sec, b_first, b_out = timings["builtin"]
  h_sec, h_first, h_out = timings["harness"]
  agree = {}
  for name, _, _ in TASKS:
    res = h_out["results"][f"bench_{name}"]
    for metric in ("acc", "acc_norm"):
      if f"{metric},none" in res:
        agree[f"{name}/{metric}"] = {
            "builtin": b_out.scores[name][metric],
            "harness": res[f"{metric},none"],
            "equal": abs(b_out.scores[name][metric]
                         - res[f"{metric},none"]) < 1e-9}
  result = {
      "command": "python " + " ".join(sys.argv),
      "preset": args.preset, "params": parameter_count(model),
      "items_per_task": args.items, "items": n_items,
      "batch_size": args.batch_size, "max_len": args.max_len,
      "lm_eval_version": lm_eval.__version__,
      "device": str(jax.devices()[0].device_kind),
      "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
      "machine": platform.machine(),
      "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
      "builtin": {"seconds": b_sec, "first_call_seconds_incl_compile": b_first,
                  "items_per_second": n_items / b_sec},
      "harness": {"seconds": h_sec, "first_call_seconds_incl_compile": h_first,
                  "model_seconds": model_seconds[0],
                  "harness_overhead_seconds": h_sec - model_seconds[0],
                  "items_per_second": n_items / h_sec},
      "harness_over_builtin_time": h_sec / b_sec,
      "scores_agree": agree,
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps({k: result[k] for k in ("builtin", "harness",
                                           "harness_over_builtin_time")},
                   indent=2))
  if not all(v["equal"] for v in agree.values()):
    sys.exit(f"built-in and harness scores differ: {agree}")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
