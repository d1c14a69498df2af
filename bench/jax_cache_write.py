"""What a write to JAX's persistent compilation cache costs as it fills.

With `jax_compilation_cache_max_size` set, JAX's file cache
(jax/_src/lru_cache.py) takes a file lock for every read and write, and
each write lists and stats every entry to decide what to evict; without a
limit it does neither. This fills a cache directory with N entries of
`--entry-kb` (written without a limit, so filling is fast), then times
`--repeats` writes of one more entry with a 16 GiB limit and without one,
alternating, and writes the medians to `--out`.

  .venv/bin/python bench/jax_cache_write.py --entries 1000,3000,10000
"""

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

from jax._src import lru_cache

import machine_load


def time_writes(entries: int, entry_kb: int, repeats: int) -> dict:
  root = tempfile.mkdtemp(prefix="jax_cache_bench_")
  try:
    fill = lru_cache.LRUCache(root, max_size=-1)
    value = os.urandom(entry_kb * 1024)
    for i in range(entries):
      fill.put(f"fill{i}", value)
    limited = lru_cache.LRUCache(root, max_size=16 << 30)
    arms = {"limit 16 GiB": limited, "no limit": fill}
    seconds = {name: [] for name in arms}
    for r in range(repeats):
      for name, cache in arms.items():
        key = f"new{r}_{name.replace(' ', '_')}"
        t0 = time.perf_counter()
        cache.put(key, value)
        seconds[name].append(time.perf_counter() - t0)
    return {"entries": entries, "entry_kb": entry_kb, "repeats": repeats,
            "median_write_s": {k: statistics.median(v)
                               for k, v in seconds.items()},
            "load1": os.getloadavg()[0]}
  finally:
    shutil.rmtree(root, ignore_errors=True)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--entries", default="1000,3000,10000")
  p.add_argument("--entry-kb", type=int, default=12)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out", default="bench/results/jax_cache_write.json")
  a = p.parse_args(argv)
  rows = []
  for n in [int(x) for x in a.entries.split(",")]:
    row = time_writes(n, a.entry_kb, a.repeats)
    rows.append(row)
    m = row["median_write_s"]
    print(f"{n:6d} entries: one write {m['limit 16 GiB'] * 1e3:8.1f} ms with"
          f" a limit, {m['no limit'] * 1e3:6.2f} ms without"
          f" (load {row['load1']:.2f})", flush=True)
  os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
  with open(a.out, "w") as f:
    json.dump({"cpu": machine_load.cpu_model(), "cores": os.cpu_count(), "rows": rows}, f,
              indent=1)
  print(f"Results in {a.out}")


if __name__ == "__main__":
  main()
