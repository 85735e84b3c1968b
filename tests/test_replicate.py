"""benchmarks/replicate.py: the whole command at --scale tiny on CPU (tokenizer, token
directory, every model trained in its own train.py process, the JSON and the plots), and
its plan (same data and schedule for every model, seeds, learning-rate search, time budget)."""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from benchmarks import replicate
from mohge_jax.config import load_config
from mohge_jax.model import Transformer
from conftest import xla_flags

# One worker runs this module: its fixture trains every model (~75 s). Session-scoped: a
# module fixture ran twice under `-n 2`, torn down when the worker ran another module's
# tests between this module's (seen in the suite's durations: two 71 s setups).
pytestmark = pytest.mark.xdist_group("replicate")

ROOT = Path(__file__).resolve().parents[1]
XLA_CACHE = tempfile.mkdtemp(prefix="mohge_test_replicate_xla_")
atexit.register(shutil.rmtree, XLA_CACHE, True)


@pytest.fixture(scope="session")
def replication(tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("replicate")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=xla_flags(1),
             JAX_COMPILATION_CACHE_DIR=XLA_CACHE,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  # One routed layer per model (the tiny scale has a dense and a routed one): every check
  # here is of the command (runs, configs, counts, shares, plots), none of the depth; 60 ->
  # 49 s alone on 2 cores.
  cmd = [sys.executable, "-m", "benchmarks.replicate", "--scale", "tiny", "--run-dir",
         str(run_dir), "--seeds", "0,1", "--seed-models", "mohge", "model.num_layers=1",
         "model.first_dense_layers=0"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  doc = json.loads((run_dir / "replication.json").read_text())
  return run_dir, doc, {r["name"]: r for r in doc["runs"]}


def direct_param_count(workdir: Path) -> int:
  cfg = load_config(workdir / "config.yaml")
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_every_model_trained_to_finite_losses(replication):
  run_dir, doc, runs = replication
  assert sorted(runs) == sorted([f"{m}_s0" for m in replicate.MODELS] + ["mohge_s1"])
  for r in runs.values():
    assert r["status"] == "ok" and r["complete"] and r["finite"], r["name"]
    assert math.isfinite(r["val_loss"]) and r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
    assert r["steps_done"] == r["steps"] == doc["settings"]["steps"]
    assert [p["step"] for p in r["val_curve"]][-1] == r["steps"] and len(r["val_curve"]) >= 2
    assert r["tokens_per_s"] > 0 and r["flops_per_token_uniform"] > 0
    workdir = Path(r["workdir"])
    assert workdir.parent == run_dir
    assert not any((workdir / "checkpoints").iterdir())  # train.save_checkpoints=false
  # The second seed is another initialisation and data order, on the same data.
  assert runs["mohge_s1"]["val_loss"] != runs["mohge_s0"]["val_loss"]


def test_models_trained_on_the_same_tokens_in_the_same_order(replication):
  _, doc, runs = replication
  cfgs = {name: load_config(Path(r["workdir"]) / "config.yaml") for name, r in runs.items()}
  first = cfgs["mohge_s0"]
  for name, cfg in cfgs.items():
    assert cfg.data == first.data and cfg.data.source.startswith("tokens:")
    want_train = (first.train if name.endswith("_s0") else
                  dataclasses.replace(first.train, seed=1))
    assert cfg.train == want_train, name
  assert cfgs["mohge_no_gw_s0"].loss.group_aux_coef == 0 < first.loss.group_aux_coef
  assert doc["data"]["num_tokens_train"] > 0 and doc["data"]["vocab_size"] == first.model.vocab_size


def test_parameter_counts(replication):
  _, doc, runs = replication
  for r in runs.values():
    assert r["params_total"] == direct_param_count(Path(r["workdir"])), r["name"]
    assert r["params_activated_uniform"] < r["params_total"]
  mohge, moe, same = (runs[f"{m}_s0"] for m in ("mohge", "moe", "moe_same_total"))
  assert mohge["params_total"] < moe["params_total"]
  assert abs(same["params_total"] - mohge["params_total"]) / mohge["params_total"] < 0.03
  assert same["group_widths"] == [round(np.mean(mohge["group_widths"]))]
  summary = doc["summary"]["mohge_vs_moe"]
  assert summary["params_total_ratio"] == pytest.approx(mohge["params_total"] / moe["params_total"])
  assert summary["val_loss_delta"] == [mohge["val_loss"] - moe["val_loss"]]


def test_group_shares_and_activated_width(replication):
  _, doc, runs = replication
  for name in ("mohge_s0", "mohge_no_gw_s0", "mohge_s1", "moe_s0"):
    r = runs[name]
    G = len(r["group_widths"])
    assert r["group_share_curve"] and all(
        len(p["share"]) == G and sum(p["share"]) == pytest.approx(1.0)
        for p in r["group_share_curve"])
    share = np.mean(r["group_share_by_layer_last"], axis=0)
    assert share.sum() == pytest.approx(1.0)
    width = float(share @ np.asarray(r["group_widths"]))
    assert r["routed_width_per_pair"]["last"] == pytest.approx(width)
    assert r["activated_expert_width_per_token"] == pytest.approx(r["top_k"] * width)
    assert min(r["group_widths"]) <= width <= max(r["group_widths"])
  assert runs["moe_s0"]["routed_width_per_pair"]["last"] == runs["moe_s0"]["group_widths"][0]
  effect = doc["summary"]["group_wise_loss_effect"]
  assert [e["seed"] for e in effect] == [0]


def test_plots_exist(replication):
  run_dir, doc, _ = replication
  for suffix in ("_loss.png", "_groups.png"):
    path = run_dir / f"replication{suffix}"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
  assert sorted(doc["plots"]) == sorted(str(run_dir / f"replication{s}")
                                        for s in ("_loss.png", "_groups.png"))


def tiny_args(**kw) -> argparse.Namespace:
  args = replicate.parse_args(["--scale", "tiny"])
  scale = replicate.SCALES["tiny"]
  args.steps, args.batch, args.seq = scale.steps, scale.batch, scale.seq
  for k, v in kw.items():
    setattr(args, k, v)
  return args


def test_plan_order_seeds_and_learning_rate_search(tmp_path):
  scale = replicate.SCALES["tiny"]
  meta = {"vocab_size": 300}
  args = tiny_args(seeds="3,4", overrides=["loss.group_aux_coef=0.5"])
  search, first, later = replicate.plan_runs(scale, args, meta, tmp_path, lr=1e-3)
  assert not search and [r.name for r in first] == [f"{m}_s3" for m in replicate.MODELS]
  assert later == [("mohge", 4), ("moe", 4)]
  # A user's override never undoes what defines a variant.
  no_gw = next(r for r in first if r.model == "mohge_no_gw")
  assert replicate.run_config(no_gw).loss.group_aux_coef == 0
  assert replicate.run_config(first[0]).loss.group_aux_coef == 0.5
  args = tiny_args(lr_search="1e-3,3e-3", models="mohge,moe")
  search, first, later = replicate.plan_runs(scale, args, meta, tmp_path, lr=1e-3)
  assert not first and {m: [r.lr for r in rs] for m, rs in search.items()} == {
      "mohge": [1e-3, 3e-3], "moe": [1e-3, 3e-3]}
  assert replicate.run_config(search["moe"][1]).train.lr == 3e-3
  with pytest.raises(ValueError, match="unknown model 'dense'"):
    replicate.plan_runs(scale, tiny_args(models="mohge,dense"), meta, tmp_path, lr=1e-3)


def test_time_budget_skips_what_would_not_fit(replication, tmp_path, monkeypatch, capsys):
  """A run that took longer than the time left is not started again; the JSON says so."""
  run_dir, _, _ = replication
  calls = []

  def fake_execute(run, workdir, timeout):
    calls.append((run.name, timeout))
    workdir.mkdir(parents=True, exist_ok=True)
    return {"status": "ok", "returncode": 0, "driver_wall_s": 200.0}

  monkeypatch.setattr(replicate, "execute", fake_execute)
  out = tmp_path / "r.json"
  rc = replicate.main(["--scale", "tiny", "--data-dir", str(run_dir / "data"), "--run-dir",
                       str(tmp_path), "--out", str(out), "--time-budget", "150"])
  assert rc == 1
  assert [name for name, _ in calls] == ["mohge_s0"] and 100 < calls[0][1] <= 150
  doc = json.loads(out.read_text())
  assert [r["status"].split(":")[0] for r in doc["runs"]] == ["ok"] + ["skipped"] * 5
  assert all(r["params_total"] > 0 for r in doc["runs"])
