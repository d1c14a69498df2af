"""The small-reproduction driver end to end, in its miniature modes."""

import collections
import dataclasses
import json
import os
import pathlib
import shutil

import numpy as np
import pytest


from optconsist_jax import errors
from optconsist_jax.evaluate import results
from optconsist_jax.experiments import eval_pool
from optconsist_jax.experiments import reproduce
from optconsist_jax.experiments import retention
from optconsist_jax.experiments import study
from optconsist_jax.experiments import study_data
from optconsist_jax import optim

import study_config

REPO = pathlib.Path(__file__).resolve().parent.parent


_config = study_config.config


def _mtimes(root):
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      p = os.path.join(dirpath, f)
      out[p] = os.stat(p).st_mtime_ns
  return out


def _records(runs):
  out = []
  for r in runs:
    out += results.read_workdir(r.workdir)
  return out


@pytest.fixture(scope="session")
def mini_run(mini_demo):
  """The mini study (2 bases x 3 methods x 2 seeds) as README's `make demo
  MODE=mini` ran it (tests/test_readme.py): (config, workdir, output)."""
  w, out = mini_demo
  return _config("mini"), w, out


# The tests sharing the mini run go to one xdist worker (make test runs
# --dist loadgroup) and the fixture is session-scoped (a module fixture is
# rebuilt whenever xdist interleaves another module's tests): one run.
@pytest.mark.xdist_group("mini_run")
def test_mini_run_has_every_seed_then_skips_everything(mini_run, monkeypatch):
  rc, tmp_path, out = mini_run
  assert rc.finetune.seeds == 2
  # Every planned run trained and was marked done: 2 bases, and
  # 2 bases x 3 methods x 1 LR x 2 seeds finetuning runs.
  bases, runs = study.plan_runs(rc, str(tmp_path),
                                    str(tmp_path / "data" / "math_train.json"))
  assert len(bases) == 2 and len(runs) == 12
  for r in bases:
    assert (pathlib.Path(r.workdir) / reproduce.DONE_FILE).exists(), r.name
  for r in runs:
    assert (pathlib.Path(r.workdir) / reproduce.DONE_FILE).exists(), r.name
    assert r.name.endswith(f"__s{r.labels['seed']}")
    # Each seed is its own data order and adapter init.
    assert r.config["data"]["seed"] == r.config["train"]["seed"] == (
        r.labels["seed"])
    # Both seeds of both bases of a method trained as one population.
    done = json.loads((pathlib.Path(r.workdir) /
                       reproduce.DONE_FILE).read_text())
    assert done["population_size"] == 2 * 2, r.name
  # The seeds saw their data in different orders: different training losses.
  final = collections.defaultdict(set)
  for r in runs:
    done = json.loads((pathlib.Path(r.workdir) /
                       reproduce.DONE_FILE).read_text())
    final[(r.labels["base"], r.labels["method"])].add(done["final_loss"])
  assert all(len(v) == 2 for v in final.values()), final

  # One base point per base model, one point per epoch checkpoint per run,
  # and a row for every (base, method, seed).
  records = _records(runs)
  assert sum(r.is_base for r in records) == 2
  finetuned = [r for r in records if not r.is_base]
  assert len(finetuned) == len(runs) * rc.finetune.epochs
  assert {(r.base, r.method, r.run.rsplit("__s", 1)[1]) for r in finetuned} == {
      (b, m, str(s)) for b in ("adamw", "muon")
      for m in ("adamw", "muon", "lora") for s in (0, 1)}
  for r in records:
    assert r.learning_metric == "-math/response_loss"
    assert r.retention_metric == "-lm_loss/loss"
    assert r.learning == -r.metrics["math/response_loss"] < 0.0
    assert 0.0 <= r.metrics["math/metamath/acc"] <= 1.0
    assert r.retention < 0.0

  # The report (per-base frontiers, the summary table, fingerprints): below,
  # from the rerun's listing, which names what the first run's did.
  summary = json.loads((tmp_path / "report" / "summary.json").read_text())
  roles = {(s["base"], s["method"]): s["role"] for s in summary}
  assert roles[("adamw", "adamw")] == "matched"
  assert roles[("adamw", "muon")] == "mismatched"
  assert roles[("muon", "lora")] == "lora"

  # Second run: nothing trains or evaluates again, no output file changes
  # except the report and run_info, which are rewritten.
  before = _mtimes(tmp_path)

  def fail(*args, **kwargs):
    raise AssertionError("a finished step ran again")

  from optconsist_jax import train  # pylint: disable=g-import-not-at-top
  from optconsist_jax.train import population  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(train, "train", fail)
  monkeypatch.setattr(population, "train_population", fail)
  from optconsist_jax.evaluate import job  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(job.Evaluator, "evaluate_model", fail)
  info = json.loads((tmp_path / "run_info.json").read_text())
  again = reproduce.run(rc, str(tmp_path))
  after = _mtimes(tmp_path)
  changed = sorted(p for p in before if after.get(p) != before[p])
  assert all(("/report/" in p) or p.endswith("run_info.json")
             for p in changed), changed

  # run_info keeps the first invocation's stage timings (one training stage
  # per population); the second one is recorded as an invocation that ran
  # nothing and skipped every stage.
  info2 = json.loads((tmp_path / "run_info.json").read_text())
  stages = {"train/adamw-base", "train/muon-base"} | {
      f"train/bases__{m}" for m in ("adamw", "muon", "lora")} | {
          f"eval/{r.name}" for r in runs} | {"fingerprints"}
  assert set(info["stage_seconds"]) == stages
  assert info["seeds"] == {"pretrain": 1, "finetune": 2}
  assert info2["stage_seconds"] == info["stage_seconds"]
  assert [len(i["stages_run"]) for i in info2["invocations"]] == [
      len(stages), 0]
  assert set(info2["invocations"][1]["stages_skipped"]) == stages
  # The rerun's listing names every output the first run listed.
  for key in ("adamw_base_png", "muon_base_png", "all_svg", "summary",
              "fingerprints_spectra", "fingerprints_activations"):
    assert os.path.getsize(again[key]) > 0, key
  pngs = {v for v in again.values() if v.endswith(".png")}
  assert len(pngs) >= 5 and all(p in out for p in pngs), (pngs, out[-2000:])


@pytest.mark.xdist_group("mini_run")
def test_a_workdir_of_another_config_is_refused(mini_run):
  # The mini study's workdir, reused after a model change (as when a mode's
  # model changes and its workdir is the default): the first done run it
  # meets is refused, naming the key that differs, and nothing is written.
  _, w, _ = mini_run
  before = _mtimes(w)
  changed = _config("mini", model=study_config.config_dict("mini")["model"]
                    | {"hidden_size": 48})
  with pytest.raises(errors.UserError,
                     match=r"bases/adamw__s0.*model\.hidden_size.*48.*fresh"
                     r" --workdir"):
    reproduce.run(changed, str(w))
  assert _mtimes(w) == before


@pytest.mark.xdist_group("mini_run")
def test_a_moved_workdir_resumes_and_a_killed_invocation_keeps_its_timings(
    mini_run, tmp_path, monkeypatch):
  # The mini study's workdir moved (its runs' configs name the old paths),
  # one run's evaluation lost; the command resumes there, evaluates that
  # run and dies in the report stage: run_info.json already holds the
  # evaluation's timing, in an unfinished invocation.
  rc, w, _ = mini_run
  moved = tmp_path / "moved"
  shutil.copytree(w, moved)
  _, runs = study.plan_runs(rc, str(moved),
                            str(moved / "data" / "math_train.json"))
  last = runs[-1]
  shutil.rmtree(pathlib.Path(last.workdir) / "eval")
  before = json.loads((moved / "run_info.json").read_text())

  def killed(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(reproduce.report, "consistency_report", killed)
  with pytest.raises(KeyboardInterrupt):
    reproduce.run(rc, str(moved))
  info = json.loads((moved / "run_info.json").read_text())
  *earlier, this = info["invocations"]
  assert earlier == before["invocations"]
  assert not this["finished"] and this["stages_run"] == [f"eval/{last.name}"]
  assert all(i["finished"] for i in earlier)
  # The stage's first timing is kept; the rerun's is the invocation's own.
  assert info["stage_seconds"] == before["stage_seconds"]
  assert info["runs"] == before["runs"]
  assert len(results.read_workdir(last.workdir)) == rc.finetune.epochs


@pytest.mark.xdist_group("mini_run")
def test_two_eval_processes_write_what_one_wrote(mini_run, tmp_path):
  # Two runs of the mini study (the first also evaluates its base), copied
  # without their results and evaluated again by two worker processes: the
  # driver's own records, timings aside, written by other processes. To
  # float32 rounding: a worker sets its process up as a command's main does
  # (one LAPACK thread), this test's process is pytest's, and the probes'
  # SVDs of a barely trained model move by up to ~1e-4 relative.
  rc, w, _ = mini_run
  test_file = str(w / "data" / "math_test.json")
  _, runs = study.plan_runs(rc, str(w), str(w / "data" / "math_train.json"))
  runs = [r for r in runs if r.labels["base"] == "adamw"][:2]
  jobs = []
  for i, r in enumerate(runs):
    copy = tmp_path / r.name
    shutil.copytree(r.workdir, copy, ignore=shutil.ignore_patterns("eval"))
    jobs.append(eval_pool.Job(r.name, str(copy), reproduce.eval_config(
        rc, r, test_file, with_base=i == 0)))
  done = list(eval_pool.evaluate_runs(jobs, workers=2))
  assert sorted(d.name for d in done) == sorted(r.name for r in runs)
  assert all(d.ran and d.pid != os.getpid() for d in done), done

  def by_checkpoint(workdir):
    return {(r.is_base, r.step): r for r in results.read_workdir(workdir)}

  for r, job in zip(runs, jobs):
    want, got = by_checkpoint(r.workdir), by_checkpoint(job.workdir)
    assert set(got) == set(want), r.name
    for key, rec in want.items():
      untimed = lambda metrics: {m: v for m, v in metrics.items()
                                 if not m.endswith("seconds")
                                 and not m.endswith("per_second")}
      assert len(untimed(rec.metrics)) < len(rec.metrics), rec.metrics
      assert untimed(got[key].metrics) == pytest.approx(
          untimed(rec.metrics), rel=1e-3, abs=1e-6), (r.name, key)
      assert (got[key].learning, got[key].retention) == pytest.approx(
          (rec.learning, rec.retention), rel=1e-5), (r.name, key)
      assert got[key].items.keys() == rec.items.keys(), (r.name, key)
      for name, item in rec.items.items():
        for part, values in item.items():
          np.testing.assert_allclose(got[key].items[name][part], values,
                                     rtol=1e-5, atol=1e-6)
  assert sum(k[0] for job in jobs for k in by_checkpoint(job.workdir)) == 1


def test_matrix_mini_run_fills_the_matrix(tmp_path):
  rc = _config("matrix_mini")
  optimizers = rc.pretrain.optimizers
  assert len(optimizers) == 2 and rc.finetune.methods == optimizers
  reproduce.run(rc, str(tmp_path))
  bases, runs = study.plan_runs(rc, str(tmp_path),
                                    str(tmp_path / "data" / "math_train.json"))
  assert [b.name for b in bases] == list(optimizers)
  records = _records(runs)
  finetuned = [r for r in records if not r.is_base]
  # Every cell of pretraining x finetuning optimizer has its rows, each run
  # used its family's optimizer and learning rate.
  assert collections.Counter((r.base, r.method) for r in finetuned) == {
      (b, m): rc.finetune.epochs for b in optimizers for m in optimizers}
  for r in runs:
    groups = r.config["optim"]["groups"]
    (group,) = groups.values()
    assert group["optimizer"] == r.labels["method"]
    assert group["schedule"]["peak"] == r.labels["lr"]
  adagrad = next(r for r in runs if r.labels["method"] == "adagrad")
  assert adagrad.config["optim"]["groups"]["main"]["kwargs"] == {
      "initial_accumulator_value": 0.0, "eps": 1e-10}
  assert {r.base for r in records if r.is_base} == set(optimizers)
  summary = json.loads((tmp_path / "report" / "summary.json").read_text())
  roles = {(s["base"], s["method"]): s["role"] for s in summary}
  assert {k for k, v in roles.items() if v == "matched"} == {
      (o, o) for o in optimizers}
  # The matrix modes draw the matrix whatever the number of bases: one row
  # per pretraining optimizer, its diagonal cell in bold, every cell filled.
  md = (tmp_path / "report" / "matrix.md").read_text()
  rows = {l.split("|")[1].strip(): l for l in md.splitlines()
          if l.startswith("| ") and l.split("|")[1].strip() in optimizers}
  assert set(rows) == set(optimizers)
  for o, line in rows.items():
    cells = [c.strip() for c in line.split("|")[3:3 + len(optimizers)]]
    assert all(cells), line
    assert sum(c.startswith("**") for c in cells) == 1, line
  assert (tmp_path / "report" / "matrix.png").stat().st_size > 0


@pytest.mark.xdist_group("mini_run")
def test_external_bases_skip_pretraining(mini_run, tmp_path):
  from optconsist_jax.io import hf  # pylint: disable=g-import-not-at-top
  from optconsist_jax.io import weights  # pylint: disable=g-import-not-at-top
  _, mini_dir, _ = mini_run
  # An Orbax run (the mini study's AdamW base) and a Hugging Face folder
  # (its Muon base, exported).
  orbax_base = mini_dir / "bases" / "adamw__s0"
  muon_dir = str(mini_dir / "bases" / "muon__s0")
  model_config = weights.model_config_of(muon_dir)
  hf.save(model_config, weights.restore_run_model(muon_dir, model_config),
          str(tmp_path / "hf_muon"))
  rc = _config("mini", reproduce={
      "bases": f"adamw:{orbax_base},muon:{tmp_path / 'hf_muon'}"},
               finetune__methods=("adamw", "lora"), finetune__seeds=1,
               finetune__epochs=1, fingerprints={"enabled": False})
  w = tmp_path / "w"
  reproduce.run(rc, str(w))
  assert not (w / "bases").exists()  # nothing pretrained
  bases, runs = study.plan_runs(rc, str(w),
                                    str(w / "data" / "math_train.json"))
  assert [(b.name, b.kind) for b in bases] == [("adamw", "orbax"),
                                                ("muon", "hf")]
  assert len(runs) == 4
  for r in runs:
    assert r.config["init_from"]["path"] == r.base.workdir
    assert r.config["model"] == {"preset": "from_init"}
    saved = json.loads((pathlib.Path(r.workdir) / "config.json").read_text())
    assert saved["model"]["hidden_size"] == model_config.hidden_size
  records = _records(runs)
  assert {(r.base, r.method) for r in records if not r.is_base} == {
      (b, m) for b in ("adamw", "muon") for m in ("adamw", "lora")}
  # Each external base was evaluated as the starting point, and scored as
  # our own base was (same weights, same data).
  base_points = {r.base: r for r in records if r.is_base}
  assert set(base_points) == {"adamw", "muon"}
  ours = {r.base: r for r in _records(
      study.plan_runs(mini_run[0], str(mini_dir), "")[1]) if r.is_base}
  for name in ("adamw", "muon"):
    assert base_points[name].retention == pytest.approx(
        ours[name].retention, abs=1e-4)
  info = json.loads((w / "run_info.json").read_text())
  assert info["seeds"]["pretrain"] == 0
  assert not {"train/adamw-base", "train/muon-base"} & set(
      info["stage_seconds"])
  # External bases may differ in architecture: a population per base.
  assert set(dict(study.population_groups(rc, bases, runs))) == {
      f"{b}-base__{m}" for b in ("adamw", "muon") for m in ("adamw", "lora")}


def test_bad_external_bases_are_one_line_errors(tmp_path):
  def bases(spec):
    return _config("mini", reproduce={"bases": spec})

  with pytest.raises(ValueError, match=r"reproduce.bases: entry 'adamw' is"
                     r" not NAME:PATH"):
    bases("adamw")
  with pytest.raises(ValueError, match=r"adamw:.*nowhere: no such file"):
    bases(f"adamw:{tmp_path / 'nowhere'}")
  with pytest.raises(ValueError, match=r"base name 'a' given twice"):
    bases(f"a:{tmp_path},a:{tmp_path}")
  # The tiny HF fixture has 64 embeddings, the shipped tokenizer 2,048 pieces.
  rc = bases(f"adamw:{REPO / 'tests' / 'fixtures' / 'hf' / 'gqa'}")
  with pytest.raises(ValueError) as e:
    study.check_bases(rc, study.plan_bases(rc, str(tmp_path)))
  assert "\n" not in str(e.value)
  assert "adamw:" in str(e.value) and "vocabulary (64)" in str(e.value)
  # An empty folder is no base of any kind.
  (tmp_path / "empty").mkdir()
  rc = bases(f"adamw:{tmp_path / 'empty'}")
  with pytest.raises(ValueError, match=r"not a readable orbax base") as e:
    study.check_bases(rc, study.plan_bases(rc, str(tmp_path)))
  assert "\n" not in str(e.value)


def test_seeds_pair_with_pretraining_seeds_and_group_into_populations():
  # quick: one pretraining seed, every finetuning seed starts from it; one
  # population per (method, budget) holding every base x seed x LR (the
  # bases share one architecture).
  rc = _config("quick")
  bases, runs = study.plan_runs(rc, "/w", "/w/train.json")
  assert len(bases) == 2 and rc.finetune.seeds >= 3
  assert {r.base.seed for r in runs} == {0}
  groups = dict(study.population_groups(rc, bases, runs))
  assert len(groups) == 2 + 3
  lrs = rc.finetune.lrs["adamw"]
  assert len(lrs) >= 3
  assert sorted((r.base.name, r.labels["seed"], r.labels["lr"])
                for r in groups["bases__muon__e2"]) == sorted(
                    (b, s, lr) for b in ("adamw", "muon")
                    for s in range(rc.finetune.seeds)
                    for lr in rc.finetune.lrs["muon"])
  # full: 3 pretraining seeds paired one to one with 3 finetuning seeds; a
  # population per (method, budget) holding every base and seed, each
  # member from its own pretraining seed's base.
  rc = _config("full")
  bases, runs = study.plan_runs(rc, "/w", "/w/train.json")
  assert len(bases) == 2 * 3 and rc.finetune.seeds == rc.pretrain.seeds == 3
  assert all(r.labels["seed"] == r.base.seed for r in runs)
  groups = dict(study.population_groups(rc, bases, runs))
  assert [len(v) for k, v in groups.items() if k.endswith("-base")] == [3, 3]
  assert len(groups) == 2 + 3 * len(rc.finetune.epoch_budgets)
  for k, v in groups.items():
    if not k.endswith("-base"):
      assert sorted({(r.labels["seed"], r.base.seed) for r in v}) == [
          (s, s) for s in range(3)]
      assert {r.config["init_from"]["path"] for r in v} == {
          b.workdir for b in bases}
  # More finetuning than pretraining seeds: they cycle over the bases.
  rc = dataclasses.replace(rc, finetune=dataclasses.replace(rc.finetune,
                                                            seeds=5))
  _, runs = study.plan_runs(rc, "/w", "/w/train.json")
  assert {(r.labels["seed"], r.base.seed) for r in runs} == {
      (0, 0), (1, 1), (2, 2), (3, 0), (4, 1)}
  # Every member of a population differs only in seed, learning rate and
  # (finetuning) its pretraining seed's base.
  for members in groups.values():
    stripped = []
    for m in members:
      d = json.loads(json.dumps(m.config))
      for key in ("seed", "dropout_seed"):
        d["train"].pop(key, None)
      d["data"].pop("seed")
      d.get("init_from", {}).pop("path", None)
      for g in d["optim"]["groups"].values():
        g["schedule"].pop("peak")
      stripped.append(d)
    assert all(s == stripped[0] for s in stripped)


def test_matrix_mode_plans_six_families_from_paired_seeds():
  rc = _config("matrix")
  families = ("adamw", "muon", "lion", "adafactor", "adagrad", "kron")
  assert rc.pretrain.optimizers == families
  assert rc.pretrain.seeds == rc.finetune.seeds == 3
  assert rc.finetune.methods == families + ("lora",)
  # Every family's grid is recorded in the config, and so is its pretraining
  # learning rate.
  assert all(len(rc.finetune.lrs[m]) >= 4 for m in rc.finetune.methods)
  assert all(rc.pretrain.peak_lr(f) > 0 for f in families)
  # Standard's model shaped like a large one, and its held-out items.
  assert rc.model == _config("standard").model
  assert rc.tokenizer_path == _config("standard").tokenizer_path
  assert rc.eval.math_examples >= 256 and rc.eval.retention_docs >= 200
  # Kron is the kron extra's PSGD Kron on every parameter.
  kron = optim.presets.preset("kron")
  assert [g.optimizer for g in kron.groups.values()] == ["psgdax:kron"]
  assert kron.routes == (("all", "main"),)
  bases, runs = study.plan_runs(rc, "/w", "/w/train.json")
  assert len(bases) == 6 * 3
  # One end-of-schedule run per (base, method, LR, seed): 4 LRs each.
  assert len(runs) == 6 * 7 * 4 * 3 == len({r.name for r in runs})
  for r in runs:
    assert r.base.seed == r.labels["seed"] == r.labels["base_seed"]
    assert r.config["checkpoint"]["keep_epochs"] is False
    assert r.config["train"]["num_epochs"] == 2
  # One population per method: every base x LR x seed (one compile each).
  groups = dict(study.population_groups(rc, bases, runs))
  assert len(groups) == 6 + 7
  assert all(len(v) == 3 if k.endswith("-base") else len(v) == 6 * 4 * 3
             for k, v in groups.items())


def test_standard_mode_plans_per_budget_runs_from_paired_seeds():
  rc = _config("standard")
  # The config's sizes (the floors): 3 pretraining seeds per base,
  # >= 6 learning rates x2 apart per method, 256 problems, 200 documents.
  assert rc.pretrain.optimizers == ("adamw", "muon")
  assert rc.pretrain.seeds == rc.finetune.seeds == 3
  assert rc.finetune.methods == ("adamw", "muon", "lora")
  for lrs in rc.finetune.lrs.values():
    assert len(lrs) >= 6
    assert all(b / a == pytest.approx(2.0) for a, b in zip(lrs, lrs[1:]))
  assert rc.eval.math_examples >= 256 and rc.eval.retention_docs >= 200
  assert rc.finetune.epoch_budgets == (1, 2)
  assert os.path.exists(rc.tokenizer_path)
  docs = retention.documents(rc)
  assert len(docs) == rc.eval.retention_docs and len(set(docs)) > 300
  bases, runs = study.plan_runs(rc, "/w", "/w/train.json")
  assert len(bases) == 2 * 3
  # 2 bases x 3 methods x 6 LRs x 3 seeds x 2 budgets, each once.
  assert len(runs) == 2 * 3 * 6 * 3 * 2
  assert len({r.name for r in runs}) == len(runs)
  assert collections.Counter(r.labels["epochs"] for r in runs) == {
      1: len(runs) // 2, 2: len(runs) // 2}
  for r in runs:
    # Finetuning seed s from pretraining seed s of its own optimizer.
    assert r.base.seed == r.labels["seed"] == r.labels["base_seed"]
    assert r.base.name == r.labels["base"]
    assert r.workdir.endswith(f"__e{r.labels['epochs']}__s{r.labels['seed']}")
    # A budget is its own whole schedule, and only its end is kept.
    assert r.config["train"]["num_epochs"] == r.labels["epochs"]
    assert r.config["checkpoint"]["keep_epochs"] is False
    assert r.config["init_from"]["path"] == r.base.workdir
    assert r.config["data"]["tokenizer_path"] == rc.tokenizer_path
  # A population per (method, budget): same length runs, every base's and
  # every pretraining seed's.
  groups = dict(study.population_groups(rc, bases, runs))
  assert len(groups) == 2 + 3 * 2
  for key, members in groups.items():
    if not key.endswith("-base"):
      assert len(members) == 2 * 6 * 3
      assert len({m.config["train"]["num_epochs"] for m in members}) == 1
  # Quick: one end-of-schedule run of 2 epochs per (LR, seed); causal keeps
  # its results' one run per (LR, seed) with a checkpoint per epoch.
  _, quick = study.plan_runs(_config("quick"), "/w", "/w/train.json")
  assert {r.labels["epochs"] for r in quick} == {2}
  _, causal = study.plan_runs(_config("causal"), "/w", "/w/train.json")
  assert all("epochs" not in r.labels and "__e" not in r.name
             for r in causal)


def test_unknown_keys_and_methods_are_named():
  with pytest.raises(ValueError, match=r"unknown keys \['bogus'\]"):
    study.ReproConfig.from_dict({"bogus": 1, "model": {}})
  with pytest.raises(ValueError, match=r"finetune.methods: unknown optimizer"
                     r" 'adamz'"):
    study.ReproConfig.from_dict({
        "model": {}, "finetune": {"methods": ["adamz"],
                                  "lrs": {"adamz": [1.0]}}})
  with pytest.raises(ValueError, match=r"finetune.lrs: no learning rates for"
                     r" methods \['muon'\]"):
    study.ReproConfig.from_dict({
        "model": {}, "finetune": {"methods": ["muon"], "lrs": {}}})
  with pytest.raises(ValueError, match=r"config.reproduce: unknown keys"
                     r" \['base'\]"):
    study.ReproConfig.from_dict({"model": {}, "reproduce": {"base": ""}})
  with pytest.raises(ValueError, match=r"reproduce.matrix='sometimes'"):
    study.ReproConfig.from_dict({"model": {},
                                 "reproduce": {"matrix": "sometimes"}})
  for bad in (0, 1.5, True):
    with pytest.raises(ValueError, match=r"reproduce.eval_workers=.*: need"
                       r" an integer >= 1"):
      study.ReproConfig.from_dict({"model": {},
                                   "reproduce": {"eval_workers": bad}})
  # The matrix modes always draw the matrix; quick leaves it to the report.
  assert _config("matrix").matrix == _config("matrix_mini").matrix == "always"
  assert _config("quick").matrix == "auto"
  assert _config("quick").eval_workers == 1


def test_a_workdirs_data_made_by_another_config_is_refused(tmp_path):
  """The data stage remakes its files on a rerun: the same config finds them
  equal (and leaves them), another one stops naming the file and the keys
  that make it, before writing anything."""
  rc = _config("mini", eval__retention_unit="paragraph")
  data = tmp_path / "data"
  train, test = study_data.write_math_data(rc, str(data))
  retention_file = study_data.write_retention_data(rc, str(data))
  written = json.loads(pathlib.Path(train).read_text())
  assert len(written) == rc.finetune.train_examples
  assert len(json.loads(pathlib.Path(test).read_text())) == (
      rc.eval.math_examples)
  assert len(pathlib.Path(retention_file).read_text().splitlines()) == (
      rc.eval.retention_docs)
  before = _mtimes(data)
  assert study_data.write_math_data(rc, str(data)) == (train, test)
  assert study_data.write_retention_data(rc, str(data)) == retention_file
  assert _mtimes(data) == before
  more = dataclasses.replace(rc, finetune=dataclasses.replace(
      rc.finetune, train_examples=rc.finetune.train_examples + 1))
  with pytest.raises(errors.UserError, match=(
      f"{train} holds other data than this config makes .*"
      f"finetune.train_examples={rc.finetune.train_examples + 1}.*"
      "use a fresh --workdir. Nothing was written")):
    study_data.write_math_data(more, str(data))
  fewer = dataclasses.replace(rc, eval=dataclasses.replace(
      rc.eval, retention_docs=rc.eval.retention_docs - 1))
  with pytest.raises(errors.UserError, match=(
      f"{retention_file} holds other data .*eval.retention_docs="
      f"{rc.eval.retention_docs - 1}")):
    study_data.write_retention_data(fewer, str(data))
  assert _mtimes(data) == before
