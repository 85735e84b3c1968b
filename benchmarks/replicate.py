"""The paper's claims at small scale: MoHGE matches MoE quality with about 20% fewer total
parameters, and its Group-Wise loss moves tokens to the cheaper (narrower) expert groups.

    python -m benchmarks.replicate [--scale h200|tiny] [--data-dir DIR] [--run-dir DIR]
        [--out FILE.json] [--steps N] [--batch B] [--seq L] [--lr LR] [--seeds 0,1]
        [--models mohge,moe,moe_same_total,mohge_no_gw] [--lr-search 3e-4,6e-4,1.2e-3]
        [--time-budget S] [--prepare-only] [--dry-run]

The models (all from train.py's configs through its `section.key=value` overrides; each
run is `train.py` in its own process, so a crash loses one run, not the experiment):

  mohge           MoHGE, every loss as the paper (Group-Wise loss from half of training,
                  alpha_g 1e-5, Delta 1024; Intra-Group loss 3e-3): configs/mohge_small.yaml
                  (8 groups x 8 experts of widths 256..1152, Kg 4, K 6, 2 shared experts)
  moe             its MoE baseline as MoE-3B is to MoHGE-3B: configs/moe_small.yaml, 64
                  experts of width 896 (the sixth of the eight MoHGE widths, as 1024 is at
                  3B), top-6, Switch loss: 1.27x MoHGE's routed parameters (3B: 1.23x)
  moe_same_total  64 experts of the MoHGE widths' mean (704), top-6: the same total
                  parameters as mohge and, under uniform routing, the same activated ones.
                  704 is not a multiple of 128, so on a GPU it runs on the `tiled` backend,
                  not the Pallas kernels: its tokens/s is not comparable (its loss is).
  mohge_no_gw     mohge with loss.group_aux_coef=0: what the Group-Wise loss does

What "the same activated parameters" means: the paper's MoE-3B activates 6 experts of 1024
against MoHGE-3B's 6 of the mean width 832 under uniform routing; this pair keeps that
relation (896 vs 704), and moe_same_total is the MoE with MoHGE's total and its
uniform-routing activated parameters. The JSON reports both counts for every model, and
for MoHGE also the activated width its router actually chose.

Same tokens, same order: every model of one seed trains on the same batches (a batch is a
pure function of (train.seed, step)). Seeds: `--seeds 0,1` sets train.seed, which drives
both the initialisation and the data order, so the second seed measures run-to-run
variation from both; within a seed the comparison stays paired. Extra seeds run the
`--seed-models` (default mohge,moe) after every model of the first seed.

Learning rate: one for all models, same warm-up and cosine (1e-3 to 1e-4, 10% warm-up at
h200 scale). `--lr-search LR1,LR2,...` instead trains every model once per learning rate
(the same budget for each model, `--lr-search-steps`, default the full run), keeps each
model's best final validation loss, and runs the further seeds with that rate. Off by
default: it multiplies the device time.

Data (`--data-dir`, default data_cache/python): a directory written by `--prepare-only`
and read by train.py as `data.source=tokens:DIR`: a byte-level BPE tokenizer
(mohge_jax.tokenizer, vocabulary 8192) trained on the training split of the Python sources
of the stdlib and the installed packages (`--source embedded,site-packages`), the tokens
split train/validation by a hash of each document's text (2% validation), at most
`--max-train-tokens` (25M) training tokens as uint16 (~50 MB). Vocabulary 8192: the ids fit
uint16, the embedding and output layer stay ~3% of MoHGE's parameters and ~10% of its
FLOPs per token at d 384, and 100 MB of code gives every merge enough examples. The
GPU machine has other packages installed, so the directory is made here and carried.

Arithmetic for --scale h200 (one H200, 989 TFLOP/s bf16 dense peak), from `--dry-run`
(FLOPs per token: benchmarks.train_step's formula, 6 x matmul parameters + causal
attention, routed experts at uniform routing):

  model            total  activated  MFLOP/token
  mohge            223M   35M        203
  moe              279M   40M        235          (mohge: 20% fewer total parameters)
  moe_same_total   223M   35M        203
  mohge_no_gw      223M   35M        203

A run is 300 steps of 64 x 1024 tokens = 19.7M tokens (under one pass over the 25M training
tokens): 4.0e15 FLOP for mohge, 4 s at peak, 27 s at 15% MFU (these d=384 models have
more fixed per-step work per FLOP than MoHGE-3B, which reached 30%), 31 s for moe, ~50 s
for moe_same_total on the tiled backend: ~190 s of training for the six runs. Start-up per
run: process and CUDA ~10 s, initialisation ~10 s (its compilation is shared by the
seeds), lowering and compilation of the step ~30 s and of the evaluation ~10 s with an
empty cache (a second seed reuses the first's: ~20 s in all), evaluation 6 x 7 batches
forward ~2 s: ~250 s for the six. Total ~440 s (~370 s at 25% MFU). `--time-budget`
(default 520 s at h200 scale) skips a run that would not finish in what is left (the
further seeds go last) and stops one that overruns, so one device command of 540 s always
returns the results made so far; `--steps` trades tokens for time.

The Group-Wise loss at this scale: it acts for 150 steps here, for 254k in the paper. At
alpha_g = 1e-5 its gradient on the group routers at initialisation is ~8% of the LM and
Intra-Group losses' (measured on CPU, real tokens, this model), a steady push against a
noisy one: expect a small shift of the token shares. `--group-aux-coef` sets alpha_g for
mohge (e.g. `--group-aux-coef 1e-3 --models mohge,mohge_no_gw --seeds 0`, a second command,
shows what a stronger push does).

Writes: per run `RUN_DIR/<model>_s<seed>/` (train.py's workdir: metrics.jsonl,
summary.json, config.yaml, train.log; no checkpoints), and `--out` (default
benchmarks/results/replication_h200.json at h200 scale, RUN_DIR/replication.json
otherwise) with every figure, `<out>_loss.png` (validation and training loss of every run
against tokens) and `<out>_groups.png` (MoHGE's token share per group over training, with
and without the Group-Wise loss), drawn by mohge_jax.plot. The JSON is rewritten after
every run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("mohge", "moe", "moe_same_total", "mohge_no_gw")


@dataclasses.dataclass(frozen=True)
class Scale:
  mohge_config: str  # the MoHGE model and its MoE pair: config files plus overrides
  moe_config: str
  mohge_overrides: tuple[str, ...]
  moe_overrides: tuple[str, ...]
  steps: int
  batch: int
  seq: int
  lr: float
  warmup_frac: float
  evals: int  # validation points over the run (and at the end)
  eval_batches: int
  log_every: int
  vocab: int  # the BPE tokenizer's vocabulary
  source: str  # what --prepare-only tokenizes
  val_permille: int
  max_train_tokens: int
  tokenizer_max_chars: int | None
  time_budget: float | None
  out: str | None  # default --out (None: RUN_DIR/replication.json)
  data_dir: str | None  # default --data-dir (None: RUN_DIR/data)


SCALES = {
    # One H200, one device command of < 540 s (module docstring).
    "h200": Scale(
        mohge_config="configs/mohge_small.yaml", moe_config="configs/moe_small.yaml",
        mohge_overrides=(), moe_overrides=(),
        steps=300, batch=64, seq=1024, lr=1e-3, warmup_frac=0.1, evals=6, eval_batches=8,
        log_every=10, vocab=8192, source="embedded,site-packages", val_permille=20,
        max_train_tokens=25_000_000, tokenizer_max_chars=None, time_budget=520.0,
        out="benchmarks/results/replication_h200.json", data_dir="data_cache/python"),
    # CPU, seconds per run: the test suite's end-to-end check of this command.
    "tiny": Scale(
        mohge_config="configs/tiny.yaml", moe_config="configs/tiny.yaml",
        mohge_overrides=(
            "model.d_model=64", "model.num_layers=2", "model.num_heads=2",
            "model.kv_lora_rank=32", "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8",
            "model.v_head_dim=16", "model.dense_ffn_width=128", "model.group_widths=[32,48,64,80]",
            "model.experts_per_group=4", "model.top_k_groups=2", "model.top_k=3",
            "model.shared_expert_width=32", "loss.group_aux_delta=64"),
        moe_overrides=(
            "model.d_model=64", "model.num_layers=2", "model.num_heads=2",
            "model.kv_lora_rank=32", "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8",
            "model.v_head_dim=16", "model.dense_ffn_width=128", "model.ffn=moe",
            "model.group_widths=[64]", "model.experts_per_group=16", "model.top_k_groups=1",
            "model.top_k=3", "model.combine_weights=renormalize", "model.shared_expert_width=32",
            "loss.group_aux_coef=0"),
        steps=8, batch=8, seq=64, lr=3e-3, warmup_frac=0.25, evals=2, eval_batches=1,
        log_every=2, vocab=512, source="embedded", val_permille=50,
        max_train_tokens=200_000, tokenizer_max_chars=2_000_000, time_budget=None, out=None,
        data_dir=None),
}


# ----------------------------------------------------------------------------- data


def prepare_data(scale: Scale, data_dir: Path, source: str, vocab: int,
                 max_train_tokens: int, log=print) -> dict:
  """Tokenizer (trained on the training split only) and the portable token directory."""
  from mohge_jax import data, tokenizer

  data_dir.mkdir(parents=True, exist_ok=True)
  tok_path = data_dir / "tokenizer.json"
  t0 = time.perf_counter()
  tok_info = tokenizer.train_file(source, vocab, tok_path, val_permille=scale.val_permille,
                                  max_chars=scale.tokenizer_max_chars)
  log(f"tokenizer: vocabulary {tok_info['vocab_size']} from {tok_info['documents']:,} training "
      f"documents ({tok_info['chars'] / 1e6:.1f}M characters) in {tok_info['seconds']:.1f} s")
  with tempfile.TemporaryDirectory(prefix="mohge_token_cache_") as cache:
    prepared = data.prepare(source, str(tok_path), val_permille=scale.val_permille,
                            cache_dir=cache)
    data.export_tokens(prepared, data_dir, source=source, max_train_tokens=max_train_tokens,
                       extra_meta=dict(val_permille=scale.val_permille,
                                       tokenizer_training={k: v for k, v in tok_info.items()
                                                           if k != "path"}))
  meta = json.loads((data_dir / "meta.json").read_text())
  size = sum(p.stat().st_size for p in data_dir.iterdir() if p.is_file())
  log(f"data: {meta['num_tokens_train']:,} train tokens ({meta['num_docs_train']:,} documents"
      f" of {meta['num_tokens_train_before_cap']:,} tokens before the cap), "
      f"{meta['num_tokens_val']:,} validation tokens ({meta['num_docs_val']:,} documents); "
      f"{data_dir}: {size / 1e6:.1f} MB; {time.perf_counter() - t0:.0f} s")
  return meta


# ----------------------------------------------------------------------------- runs


@dataclasses.dataclass
class Run:
  model: str
  seed: int
  lr: float
  name: str
  config: str
  overrides: list[str]


def mean_width(scale: Scale, overrides: list[str]) -> int:
  """The mean of the MoHGE model's group widths (the same-total MoE's expert width)."""
  from mohge_jax.config import load_config

  cfg = load_config(ROOT / scale.mohge_config, [*scale.mohge_overrides, *overrides])
  widths = cfg.model.group_widths
  return int(round(sum(widths) / len(widths)))


def make_run(scale: Scale, model: str, seed: int, lr: float, args, meta: dict,
             data_dir: Path, name: str | None = None) -> Run:
  """train.py's config and overrides for one run, in this order: the scale's model
  (config file and overrides), what every run shares (data, schedule, seed, logging), the
  user's overrides, and last what defines the model variant (so nothing undoes it)."""
  steps = args.steps
  common = [
      f"data.source=tokens:{data_dir}", f"data.tokenizer={data_dir / 'tokenizer.json'}",
      f"model.vocab_size={meta['vocab_size']}", f"model.max_seq_len={args.seq}",
      f"train.steps={steps}", f"train.batch_size={args.batch}", f"train.seq_len={args.seq}",
      "train.grad_accum=1", f"train.lr={lr}", f"train.min_lr={lr / 10}",
      f"train.warmup_steps={max(1, round(scale.warmup_frac * steps))}", f"train.seed={seed}",
      f"train.log_every={min(scale.log_every, steps)}",
      f"train.eval_every={max(1, steps // scale.evals)}",
      f"train.eval_batches={scale.eval_batches}", "train.save_checkpoints=false"]
  if model in ("mohge", "mohge_no_gw"):
    config, base = scale.mohge_config, list(scale.mohge_overrides)
    variant = (["loss.group_aux_coef=0"] if model == "mohge_no_gw" else
               [f"loss.group_aux_coef={args.group_aux_coef}"] if args.group_aux_coef is not None
               else [])
  elif model in ("moe", "moe_same_total"):
    config, base = scale.moe_config, list(scale.moe_overrides)
    variant = ([f"model.group_widths=[{mean_width(scale, args.overrides)}]"]
               if model == "moe_same_total" else [])
  else:
    raise ValueError(f"unknown model {model!r}; models: {', '.join(MODELS)}")
  return Run(model=model, seed=seed, lr=lr, name=name or f"{model}_s{seed}", config=config,
             overrides=[*base, *common, *args.overrides, *variant])


def plan_runs(scale: Scale, args, meta: dict, data_dir: Path, lr: float
              ) -> tuple[dict[str, list[Run]], list[Run], list[tuple[str, int]]]:
  """(learning-rate search runs per model, the first seed's runs, the further seeds'
  (model, seed) pairs, run with each model's chosen rate), in the order they run."""
  models = [m.strip() for m in args.models.split(",") if m.strip()]
  seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  seed_models = [m.strip() for m in args.seed_models.split(",") if m.strip()]
  for m in models + seed_models:
    if m not in MODELS:
      raise ValueError(f"unknown model {m!r}; models: {', '.join(MODELS)}")
  if not seeds:
    raise ValueError("--seeds names no seed")
  search: dict[str, list[Run]] = {}
  first: list[Run] = []
  if args.lr_search:
    search_args = argparse.Namespace(**{**vars(args), "steps": args.lr_search_steps or args.steps})
    for m in models:
      search[m] = [make_run(scale, m, seeds[0], float(x), search_args, meta, data_dir,
                            name=f"{m}_lr{float(x):g}_s{seeds[0]}")
                   for x in args.lr_search.split(",")]
  else:
    first = [make_run(scale, m, seeds[0], lr, args, meta, data_dir) for m in models]
  return search, first, [(m, s) for s in seeds[1:] for m in seed_models]


def run_config(run: Run):
  from mohge_jax.config import load_config
  return load_config(ROOT / run.config, run.overrides)


def execute(run: Run, workdir: Path, timeout: float | None) -> dict:
  """train.py in its own process (output to WORKDIR/train.log); reuses a complete earlier
  run of the same config in the same workdir."""
  summary_path = workdir / "summary.json"
  if summary_path.is_file() and (workdir / "config.yaml").is_file():
    from mohge_jax.config import load_config
    same = load_config(workdir / "config.yaml") == run_config(run)
    summary = json.loads(summary_path.read_text())
    if same and summary.get("step") == run_config(run).train.steps:
      return {"status": "ok", "reused": True, "returncode": 0, "driver_wall_s": 0.0}
  if workdir.exists():
    shutil.rmtree(workdir)
  workdir.mkdir(parents=True)
  cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / run.config),
         "--workdir", str(workdir), *run.overrides]
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  t0 = time.perf_counter()
  with open(workdir / "train.log", "w") as log:
    log.write(" ".join(cmd) + "\n")
    log.flush()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
      rc = proc.wait(timeout=timeout)
      status = "ok" if rc == 0 else f"failed (exit status {rc})"
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)  # its own session: the run and nothing else
      proc.wait()
      rc, status = None, f"stopped: over the time budget ({timeout:.0f} s left for it)"
  out = {"status": status, "returncode": rc, "driver_wall_s": time.perf_counter() - t0}
  if rc != 0:
    out["log_tail"] = (workdir / "train.log").read_text()[-3000:]
  return out


# ----------------------------------------------------------------------------- results


def read_rows(workdir: Path) -> list[dict]:
  path = workdir / "metrics.jsonl"
  if not path.is_file():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def expert_tokens_from_shares(cfg, shares_LxG: np.ndarray, tokens: int) -> np.ndarray:
  """Token-expert pairs per expert [L, E] with each group's pairs spread evenly over its
  experts (the metrics keep groups): the same routed FLOPs, since a group's experts share
  a width."""
  m = cfg.model
  pairs_LxG = np.asarray(shares_LxG, np.float64) * m.top_k * tokens
  return np.repeat(pairs_LxG / m.experts_per_group, m.experts_per_group, axis=1)


def analyse(run: Run, workdir: Path, outcome: dict) -> dict:
  """Every figure of one run, from its workdir."""
  from benchmarks.train_step import model_flops_per_token
  from mohge_jax import params as params_lib

  cfg = run_config(run)
  m, t = cfg.model, cfg.train
  tokens_per_step = t.batch_size * t.seq_len
  counts = params_lib.count(cfg)
  rows = read_rows(workdir)
  res = {"name": run.name, "model": run.model, "seed": run.seed, "lr": run.lr,
         "config": run.config, "overrides": run.overrides, "workdir": str(workdir), **outcome,
         "steps_done": rows[-1]["step"] if rows else 0, "steps": t.steps,
         "tokens": t.steps * tokens_per_step, "tokens_per_step": tokens_per_step,
         "params_total": counts["total"], "params_activated_uniform": counts["activated"],
         "params_breakdown": counts["breakdown"], "group_widths": list(m.group_widths),
         "top_k": m.top_k, "experts": m.num_experts,
         "group_aux_coef": cfg.loss.group_aux_coef, "group_aux_start_step": cfg.group_aux_start}
  routed_layers = sum(k in ("mohge", "moe") for k in m.ffn_kinds)
  uniform_LxG = np.full((routed_layers, m.num_groups), 1.0 / m.num_groups)
  res["flops_per_token_uniform"] = model_flops_per_token(
      cfg, expert_tokens_from_shares(cfg, uniform_LxG, tokens_per_step), tokens_per_step)
  val = [(r["step"], r["val_loss"]) for r in rows if isinstance(r.get("val_loss"), float)]
  res["val_curve"] = [{"step": s, "tokens": s * tokens_per_step, "val_loss": v} for s, v in val]
  if val and val[-1][0] == t.steps:
    res["val_loss"] = val[-1][1]
    res["val_ppl"] = math.exp(val[-1][1])
  lm = [r["lm_loss"] for r in rows if isinstance(r.get("lm_loss"), (int, float))]
  if lm:
    res["train_lm_loss_last"] = lm[-1]
  rates = [r["tokens_per_s"] for r in rows[1:] if isinstance(r.get("tokens_per_s"), float)]
  if rates:  # not the first row: its rate includes the first step's own run
    res["tokens_per_s"] = statistics.median(rates)
  first = rows[0] if rows else {}
  for key in ("time_to_first_step_s", "compile_s", "lower_s", "init_s"):
    if key in first:
      res[key] = first[key]
  summary_path = workdir / "summary.json"
  if summary_path.is_file():
    res["train_wall_s"] = json.loads(summary_path.read_text()).get("wall_s")

  # Routing: the share of token-expert pairs per group, and the width they activate.
  widths_G = np.asarray(m.group_widths, np.float64)
  routed = [(r["step"], np.asarray(r["group_share_by_layer"], np.float64)) for r in rows
            if "group_share_by_layer" in r]
  if routed:
    steps = [s for s, _ in routed]
    width_per_pair = [float((sh_LxG.mean(0) * widths_G).sum()) for _, sh_LxG in routed]
    flops = [model_flops_per_token(cfg, expert_tokens_from_shares(cfg, sh_LxG, tokens_per_step),
                                   tokens_per_step) for _, sh_LxG in routed]
    after = [i for i, s in enumerate(steps) if s > cfg.group_aux_start] or [len(steps) - 1]
    end = [i for i, s in enumerate(steps) if s > 0.9 * t.steps] or [len(steps) - 1]
    share_G = routed[-1][1].mean(0)
    res["group_share_curve"] = [{"step": r["step"], "share": r["group_share"]} for r in rows
                                if "group_share" in r]
    res["group_share_last"] = share_G.tolist()  # the last logged batch
    res["group_share_last_tenth"] = np.mean([routed[i][1].mean(0) for i in end], 0).tolist()
    res["group_share_by_layer_last"] = routed[-1][1].tolist()
    res["group_share_small_half_last"] = float(share_G[:max(m.num_groups // 2, 1)].sum())
    res["routed_width_per_pair"] = {
        "last": width_per_pair[-1], "mean": float(np.mean(width_per_pair)),
        "mean_after_group_aux_start": float(np.mean([width_per_pair[i] for i in after])),
        "mean_last_tenth": float(np.mean([width_per_pair[i] for i in end])),
        "uniform": float(widths_G.mean())}
    res["routed_width_curve"] = [{"step": s, "width_per_pair": w}
                                 for s, w in zip(steps, width_per_pair)]
    res["activated_expert_width_per_token"] = m.top_k * width_per_pair[-1]
    res["flops_per_token"] = {"last": flops[-1], "mean": float(np.mean(flops)),
                              "uniform": res["flops_per_token_uniform"]}
    routed_now = routed_layers * m.top_k * 3 * m.d_model * width_per_pair[-1]
    res["params_activated_last"] = int(round(
        counts["total"] - counts["breakdown"]["routed_experts"] + routed_now))
  res["complete"] = bool(rows) and rows[-1]["step"] == t.steps and outcome["status"] == "ok"
  res["finite"] = bool(lm) and all(math.isfinite(x) for x in lm) and all(
      math.isfinite(v) for _, v in val)
  return res


def summarise(results: list[dict]) -> dict:
  """Per model over seeds, and the comparisons the claims rest on."""
  by_model: dict[str, list[dict]] = {}
  for r in results:
    if r.get("complete") and "val_loss" in r and not r.get("lr_search_only"):
      by_model.setdefault(r["model"], []).append(r)

  def mean_of(rs, get):
    vals = [get(r) for r in rs]
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None

  models = {}
  for model, rs in by_model.items():
    models[model] = {
        "seeds": [r["seed"] for r in rs], "val_loss": [r["val_loss"] for r in rs],
        "val_loss_mean": mean_of(rs, lambda r: r["val_loss"]),
        "val_ppl_mean": mean_of(rs, lambda r: r["val_ppl"]),
        "params_total": rs[0]["params_total"],
        "params_activated_uniform": rs[0]["params_activated_uniform"],
        "params_activated_last": mean_of(rs, lambda r: r.get("params_activated_last")),
        "flops_per_token_last": mean_of(rs, lambda r: r.get("flops_per_token", {}).get("last")),
        "tokens_per_s": mean_of(rs, lambda r: r.get("tokens_per_s")),
        "routed_width_per_pair_last": mean_of(
            rs, lambda r: r.get("routed_width_per_pair", {}).get("last"))}
  out: dict = {"models": models}

  def paired(a: str, b: str) -> dict | None:
    """a - b for every seed both ran, and a's parameters relative to b's."""
    if a not in models or b not in models:
      return None
    la = {r["seed"]: r["val_loss"] for r in by_model[a]}
    lb = {r["seed"]: r["val_loss"] for r in by_model[b]}
    seeds = sorted(set(la) & set(lb))
    deltas = [la[s] - lb[s] for s in seeds]
    ratio = lambda k: (models[a][k] / models[b][k]  # noqa: E731
                       if models[a][k] is not None and models[b][k] else None)
    return {"seeds": seeds, "val_loss_delta": deltas,
            "val_loss_delta_mean": float(np.mean(deltas)) if deltas else None,
            "val_loss_delta_rel_mean": (float(np.mean([d / lb[s] for d, s in zip(deltas, seeds)]))
                                        if deltas else None),
            "params_total_ratio": ratio("params_total"),
            "params_activated_uniform_ratio": ratio("params_activated_uniform"),
            "params_activated_last_ratio": ratio("params_activated_last"),
            "flops_per_token_last_ratio": ratio("flops_per_token_last")}

  out["mohge_vs_moe"] = paired("mohge", "moe")
  out["mohge_vs_moe_same_total"] = paired("mohge", "moe_same_total")
  out["mohge_vs_mohge_no_gw"] = paired("mohge", "mohge_no_gw")
  out["seed_spread_val_loss"] = {m: float(max(v["val_loss"]) - min(v["val_loss"]))
                                 for m, v in models.items() if len(v["val_loss"]) > 1}
  if "mohge" in by_model and "mohge_no_gw" in by_model:
    gw = {r["seed"]: r for r in by_model["mohge"]}
    no = {r["seed"]: r for r in by_model["mohge_no_gw"]}
    out["group_wise_loss_effect"] = [{
        "seed": s,
        "routed_width_per_pair_with": gw[s]["routed_width_per_pair"],
        "routed_width_per_pair_without": no[s]["routed_width_per_pair"],
        "group_share_last_tenth_with": gw[s]["group_share_last_tenth"],
        "group_share_last_tenth_without": no[s]["group_share_last_tenth"],
        "small_half_share_last_with": gw[s]["group_share_small_half_last"],
        "small_half_share_last_without": no[s]["group_share_small_half_last"]}
        for s in sorted(set(gw) & set(no))]
  return out


def device_name() -> str:
  """Without touching the accelerator (the runs need all of it)."""
  try:
    proc = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                          capture_output=True, text=True, timeout=30)
    if proc.returncode == 0 and proc.stdout.strip():
      names = proc.stdout.strip().splitlines()
      return f"{len(names)} x {names[0]}" if len(names) > 1 else names[0]
  except (OSError, subprocess.TimeoutExpired):
    pass
  return "cpu"


def write_outputs(out: Path, header: dict, results: list[dict], plots: bool) -> None:
  doc = {**header, "runs": results, "summary": summarise(results)}
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(doc, indent=1) + "\n")
  tmp.replace(out)
  if plots:
    doc["plots"] = [str(p) for p in make_plots(out, results)]
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(out)


def make_plots(out: Path, results: list[dict]) -> list[Path]:
  """`<out>_loss.png` and `<out>_groups.png`, drawn by mohge_jax.plot."""
  from mohge_jax import plot

  done = [r for r in results if r.get("steps_done") and not r.get("lr_search_only")]
  if not done:
    return []
  runs: dict[str, dict[int, list[dict]]] = {}
  for r in done:
    runs.setdefault(r["model"], {})[r["seed"]] = read_rows(Path(r["workdir"]))
  tokens_per_step = done[0]["tokens_per_step"]
  paths = [plot.plot_loss_comparison(
      runs, out.with_name(out.stem + "_loss.png"), tokens_per_step=tokens_per_step,
      title=f"MoHGE vs MoE: {done[0]['tokens'] / 1e6:.1f}M tokens per run, same batches")]
  mohge = {m: v for m, v in runs.items() if m.startswith("mohge")}
  if mohge:
    widths = next(r["group_widths"] for r in done if r["model"].startswith("mohge"))
    starts = {r["model"]: r["group_aux_start_step"] for r in done
              if r["model"].startswith("mohge") and r["group_aux_coef"] > 0}
    paths.append(plot.plot_group_shares(
        mohge, widths, out.with_name(out.stem + "_groups.png"), tokens_per_step=tokens_per_step,
        group_aux_start=starts,
        title="MoHGE: routed token-expert pairs per expert group, with and without the "
              "Group-Wise loss"))
  return paths


def print_table(results: list[dict]) -> None:
  print(f"\n{'run':<22}{'status':<10}{'total M':>9}{'act. M':>8}{'MFLOP/tok':>10}"
        f"{'val loss':>10}{'ppl':>8}{'tok/s':>11}{'width/pair':>11}{'wall s':>8}")
  for r in results:
    flops = r.get("flops_per_token", {}).get("last", r.get("flops_per_token_uniform"))
    width = r.get("routed_width_per_pair", {}).get("last")
    print(f"{r['name']:<22}{r['status'][:9]:<10}{r['params_total'] / 1e6:>9.1f}"
          f"{r.get('params_activated_last', r['params_activated_uniform']) / 1e6:>8.1f}"
          + (f"{flops / 1e6:>10.1f}" if flops is not None else f"{'-':>10}")
          + (f"{r['val_loss']:>10.4f}{r['val_ppl']:>8.2f}" if "val_loss" in r else f"{'-':>18}")
          + (f"{r['tokens_per_s']:>11,.0f}" if "tokens_per_s" in r else f"{'-':>11}")
          + (f"{width:>11.1f}" if width is not None else f"{'-':>11}")
          + f"{r.get('driver_wall_s', 0):>8.0f}", flush=True)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--scale", choices=sorted(SCALES), default="h200")
  ap.add_argument("--data-dir", default=None,
                  help="the token directory (made here if missing; default by scale)")
  ap.add_argument("--source", default=None, help="what --prepare-only tokenizes (data.source)")
  ap.add_argument("--vocab", type=int, default=None, help="the BPE tokenizer's vocabulary")
  ap.add_argument("--max-train-tokens", type=int, default=None)
  ap.add_argument("--prepare-only", action="store_true",
                  help="train the tokenizer and write the token directory, then stop")
  ap.add_argument("--run-dir", default=None,
                  help="the runs' workdirs (default runs/replicate_<scale>)")
  ap.add_argument("--out", default=None, help="the results JSON (PNGs next to it)")
  ap.add_argument("--models", default=",".join(MODELS))
  ap.add_argument("--seeds", default="0,1", help="train.seed values; the first runs every model")
  ap.add_argument("--seed-models", default="mohge,moe", help="the models of the further seeds")
  ap.add_argument("--steps", type=int, default=None)
  ap.add_argument("--batch", type=int, default=None, help="global batch, sequences")
  ap.add_argument("--seq", type=int, default=None)
  ap.add_argument("--lr", type=float, default=None)
  ap.add_argument("--group-aux-coef", type=float, default=None,
                  help="alpha_g of the Group-Wise loss for mohge (default: the config's 1e-5)")
  ap.add_argument("--lr-search", default=None,
                  help="comma-separated learning rates: every model once per rate, the best kept")
  ap.add_argument("--lr-search-steps", type=int, default=None,
                  help="steps of each search run (default: --steps; the best run is reused)")
  ap.add_argument("--time-budget", type=float, default=None,
                  help="seconds for the whole command (default by scale; 0: none)")
  ap.add_argument("--dry-run", action="store_true",
                  help="print the runs, their parameters and FLOPs per token; train nothing")
  ap.add_argument("overrides", nargs="*", metavar="section.key=value",
                  help="extra train.py overrides for every run")
  return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  t_start = time.perf_counter()
  args = parse_args(argv)
  jax.config.update("jax_platforms", "cpu")  # this process never takes the accelerator
  scale = SCALES[args.scale]
  args.steps = args.steps or scale.steps
  args.batch = args.batch or scale.batch
  args.seq = args.seq or scale.seq
  lr = args.lr or scale.lr
  budget = scale.time_budget if args.time_budget is None else (args.time_budget or None)
  run_dir = Path(args.run_dir or ROOT / "runs" / f"replicate_{args.scale}").absolute()
  data_dir = Path(args.data_dir or (ROOT / scale.data_dir if scale.data_dir else
                                    run_dir / "data")).absolute()
  out = Path(args.out or (ROOT / scale.out if scale.out else run_dir / "replication.json"))

  if args.dry_run and not (data_dir / "meta.json").is_file():
    meta = {"vocab_size": args.vocab or scale.vocab}
  elif not (data_dir / "meta.json").is_file() or args.prepare_only:
    source = args.source or scale.source
    print(f"preparing {data_dir} from {source!r}", flush=True)
    try:
      prepare_data(scale, data_dir, source, args.vocab or scale.vocab,
                   args.max_train_tokens or scale.max_train_tokens)
    except (FileNotFoundError, ValueError) as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    if args.prepare_only:
      return 0
  if not args.dry_run or (data_dir / "meta.json").is_file():
    meta = json.loads((data_dir / "meta.json").read_text())

  try:
    search, plan, later = plan_runs(scale, args, meta, data_dir, lr)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
  if args.dry_run:
    return dry_run([r for rs in search.values() for r in rs] + plan
                   + [make_run(scale, m, s, lr, args, meta, data_dir) for m, s in later])

  header = {"what": "MoHGE vs MoE at small scale (benchmarks/replicate.py)",
            "command": " ".join(["python -m benchmarks.replicate", *(argv or sys.argv[1:])]),
            "scale": args.scale, "date": datetime.date.today().isoformat(),
            "device": device_name(), "jax_version": jax.__version__,
            "data": {k: meta.get(k) for k in ("source", "vocab_size", "num_tokens_train",
                                              "num_docs_train", "num_tokens_val",
                                              "num_docs_val", "val_permille",
                                              "tokenizer_training")},
            "settings": {"steps": args.steps, "batch": args.batch, "seq": args.seq,
                         "tokens_per_run": args.steps * args.batch * args.seq, "lr": lr,
                         "min_lr": lr / 10, "warmup_frac": scale.warmup_frac, "seeds": seeds,
                         "seed_models": args.seed_models, "lr_search": args.lr_search,
                         "time_budget_s": budget, "overrides": args.overrides}}
  results: list[dict] = []
  walls: list[float] = []

  def run_one(run: Run, lr_search_only: bool = False) -> dict:
    workdir = run_dir / run.name
    left = None if budget is None else budget - (time.perf_counter() - t_start)
    expected = expected_wall(run, results, walls)
    if left is not None and (left < 20 or (expected and left < 0.9 * expected)):
      res = {"name": run.name, "model": run.model, "seed": run.seed, "lr": run.lr,
             "status": f"skipped: {left:.0f} s of the time budget left", "returncode": None,
             "driver_wall_s": 0.0, **_static(run)}
      print(f"[{time.perf_counter() - t_start:5.0f} s] {run.name}: {res['status']}", flush=True)
    else:
      print(f"[{time.perf_counter() - t_start:5.0f} s] {run.name}: train.py --config "
            f"{run.config} ({len(run.overrides)} overrides)", flush=True)
      outcome = execute(run, workdir, None if left is None else max(left - 5, 1))
      if not outcome.get("reused"):
        walls.append(outcome["driver_wall_s"])
      res = analyse(run, workdir, outcome)
      print(f"[{time.perf_counter() - t_start:5.0f} s] {run.name}: {res['status']}"
            + (f", val loss {res['val_loss']:.4f}" if "val_loss" in res else "")
            + (f", {res['tokens_per_s']:,.0f} tokens/s" if "tokens_per_s" in res else "")
            + f", {outcome['driver_wall_s']:.0f} s", flush=True)
      if "log_tail" in outcome:
        print(outcome["log_tail"][-1500:], flush=True)
    res["lr_search_only"] = lr_search_only
    results.append(res)
    write_outputs(out, header, results, plots=False)
    return res

  chosen: dict[str, float] = {}
  for m, runs in search.items():
    found = [run_one(r, lr_search_only=True) for r in runs]
    scored = [(r["val_loss"], r["lr"], r) for r in found if "val_loss" in r and r["finite"]]
    if scored:
      _, chosen[m], best = min(scored, key=lambda x: x[0])
      if (args.lr_search_steps or args.steps) == args.steps:
        best["lr_search_only"] = False  # the best search run is this model's result
      else:
        run_one(make_run(scale, m, seeds[0], chosen[m], args, meta, data_dir))
  if search:
    header["lr_search_result"] = {m: {"chosen": chosen.get(m), "val_loss": {
        f"{r['lr']:g}": r.get("val_loss") for r in results if r["model"] == m}}
        for m in search}
  for run in plan:
    run_one(run)
  for m, s in later:
    run_one(make_run(scale, m, s, chosen.get(m, lr), args, meta, data_dir))

  header["wall_s"] = time.perf_counter() - t_start
  write_outputs(out, header, results, plots=True)
  print_table(results)
  print(f"\nwrote {out} and its plots ({header['wall_s']:.0f} s)", flush=True)
  return 0 if all(r["status"] == "ok" for r in results) else 1


def expected_wall(run: Run, results: list[dict], walls: list[float]) -> float | None:
  """How long `run` will take: the same model's earlier run less its step's lowering and
  compilation (now in the cache), else the median of the runs so far."""
  same = [r for r in results if r["model"] == run.model and r.get("complete")
          and not r.get("reused")]
  if same:
    r = same[-1]
    return r["driver_wall_s"] - r.get("lower_s", 0.0) - r.get("compile_s", 0.0)
  return statistics.median(walls) if walls else None


def _static(run: Run) -> dict:
  """The figures of a run that never trained."""
  from mohge_jax import params as params_lib

  counts = params_lib.count(run_config(run))
  return {"params_total": counts["total"], "params_activated_uniform": counts["activated"],
          "steps_done": 0, "complete": False, "finite": False, "config": run.config,
          "overrides": run.overrides}


def dry_run(runs: list[Run]) -> int:
  from benchmarks.train_step import PEAK_TFLOPS, model_flops_per_token
  from mohge_jax import params as params_lib

  print(f"{'run':<24}{'total M':>9}{'act. M':>8}{'MFLOP/tok':>10}{'tokens M':>10}"
        f"{'s at peak':>10}{'s at 15%':>9}{'s at 25%':>9}")
  for run in runs:
    cfg = run_config(run)
    m, t = cfg.model, cfg.train
    tokens = t.batch_size * t.seq_len
    counts = params_lib.count(cfg)
    routed_layers = sum(k in ("mohge", "moe") for k in m.ffn_kinds)
    flops = model_flops_per_token(cfg, expert_tokens_from_shares(
        cfg, np.full((routed_layers, m.num_groups), 1 / m.num_groups), tokens), tokens)
    total = flops * tokens * t.steps
    peak = total / (PEAK_TFLOPS * 1e12)
    print(f"{run.name:<24}{counts['total'] / 1e6:>9.1f}{counts['activated'] / 1e6:>8.1f}"
          f"{flops / 1e6:>10.1f}{tokens * t.steps / 1e6:>10.1f}{peak:>10.1f}"
          f"{peak / 0.15:>9.1f}{peak / 0.25:>9.1f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
