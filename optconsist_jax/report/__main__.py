r"""Learning/forgetting Pareto plot, tables and intervals across runs.

  python -m optconsist_jax.report W1 W2 ... --out DIR [--x METRIC] [--y METRIC]
      [--matrix auto|always|never] [--interval t|percentile|studentized]

Reads the eval results of every workdir (the eval job's output, one
`results.EvalRecord` per evaluated checkpoint in W/eval/results/, or per
line of an older W/eval/results.jsonl; schema below), draws one point per
evaluated checkpoint at x = retention, y = learning (marker size by epoch, colour by
finetuning method, marker shape by the base model's pretraining optimizer, the
base models as stars), the non-dominated frontier over all points, and writes
DIR/pareto.png, DIR/pareto.svg and DIR/pareto.md (a markdown table).
Layout follows Biderman et al. 2024 ("LoRA Learns Less and Forgets Less"),
Fig. 1: one dot per (run, epoch), bigger dots for more epochs. Then
`write_consistency`: matched vs the other methods at equal learning, mean
with a 95% interval over seeds (`--interval`) and a verdict per base
(DIR/summary.md, frontiers.png, gaps.png; report/consistency.py), and
with >= 3 pretraining optimizers the consistency matrix (DIR/matrix.*).
Figures are drawn by report/plots.py; the schema of the records is
optconsist_jax.evaluate.results. Workdirs and DIR may be local or gs://.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import os

from optconsist_jax import errors
from optconsist_jax import paths as paths_lib
from optconsist_jax import storage
from optconsist_jax.evaluate import results
from optconsist_jax.report import statistics
from optconsist_jax.report import tables


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(
      prog="python -m optconsist_jax.report",
      description="Pareto plot (learning vs. retention) and table across"
      " runs, from each W's eval results, and the matched-vs-others"
      " summary with intervals over seeds.")
  p.add_argument("workdirs", nargs="+", help="run directories W")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--x", default=None, help="retention metric (a key of each"
                 " record's `metrics`; default: the headline `retention`)")
  p.add_argument("--y", default=None, help="learning metric (default: the"
                 " headline `learning`)")
  p.add_argument("--title", default="")
  p.add_argument("--matrix", choices=tables.MATRIX_MODES, default="auto",
                 help="the pretraining x finetuning optimizer matrix (auto:"
                 f" with >= {tables.MATRIX_MIN_BASES} pretraining optimizers)")
  p.add_argument("--interval", choices=statistics.METHODS,
                 default=None, help="interval over seeds (default t;"
                 " report/statistics.py says why)")
  args = p.parse_args(argv)
  args.workdirs = [paths_lib.resolve(w) for w in args.workdirs]
  args.out = paths_lib.resolve(args.out)
  records = []
  with errors.user_input():
    try:
      for w in args.workdirs:
        records.extend(results.read_workdir(w))
      # A bucket --out (gs://) is written locally, then uploaded.
      with storage.output_dir(args.out) as out:
        paths = tables.make_report(records, out, x_metric=args.x,
                                   y_metric=args.y, title=args.title)
        if any(not r.is_base for r in records):
          paths.update(tables.write_consistency(
              tables.headline_records(records, args.x, args.y), out,
              matrix=args.matrix, interval=args.interval))
        names = ", ".join(os.path.relpath(p, out) for p in paths.values())
    except results.EvalFileError as e:
      raise errors.UserError(str(e)) from e
  print(f"{len(records)} points from {len(args.workdirs)} workdirs; outputs"
        f" in {args.out}: {names}")
  return 0


if __name__ == "__main__":
  errors.run(main, absl=False)
