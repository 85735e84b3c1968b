"""Training-step throughput: the real jit-compiled step (forward, backward, AdamW update).

    python -m benchmarks.train_step [--configs configs/mohge_3b.yaml,configs/moe_3b.yaml]
        [--seq 4096] [--batch 8 | --find-batch 16,8,4,2,1] [--reps 5] [--out FILE.json]
        [--routing model|uniform] [key=value ...]  # overrides, e.g. model.remat=save_dots

Per config: step time (median of repeats after warm-up), tokens/s, model FLOPs per token,
MFU against the H200's 989 TFLOP/s dense bf16 peak and against the dense matmul rate
measured in the same run, peak device memory, and the start-up a user waits for: init,
lower, compile and first step timed apart (`time_to_first_step_s` = lower + compile +
first step) with an empty compilation cache, and with `--warm` again with it filled.
Each measurement runs in its own process (exact peak memory, honest cold start).
`--find-batch` tries per-device batch sizes from the first and keeps the largest that
compiles and runs.

Model FLOPs per token (training = 3 x forward = 6 x matmul parameters):
  6 * (non-embedding matmul parameters, routed experts excluded)
  + 6 * 3 * d * sum over routed pairs of the expert's width / tokens   (actual routing)
  + per layer 3 * 2 * (S/2) * H * (d_qk + d_v)                          (causal attention)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from mohge_jax import allocation, collectives, sharding
from mohge_jax import params as params_lib
from mohge_jax.config import Config, load_config
from mohge_jax.trainer import abstract_state, graph_def, make_init_fn, make_train_step

PEAK_TFLOPS = 989.0  # H200 dense bf16, datasheet


def model_flops_per_token(cfg: Config, expert_tokens_LxE: np.ndarray, tokens: int) -> float:
  """The formula of the module docstring, with the routed widths of this step."""
  m = cfg.model
  c = params_lib.count(cfg)["breakdown"]
  dense_params = (c["attention"] + c["dense_ffn"] + c["shared_experts"] + c["router"]
                  + c["head"])
  widths_E = np.repeat(np.asarray(m.group_widths, np.float64), m.experts_per_group)
  routed = 3 * m.d_model * float((expert_tokens_LxE * widths_E).sum()) / tokens
  if m.attention == "mla":
    d_qk, d_v = m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim
  else:
    d_qk = d_v = m.head_dim
  attention = m.num_layers * 3 * 2 * (cfg.train.seq_len / 2) * m.num_heads * (d_qk + d_v)
  return 6 * dense_params + 6 * routed + attention


def dense_rate_tflops(reps: int) -> float:
  a = jnp.asarray(np.random.default_rng(0).normal(size=(16384, 8192)), jnp.bfloat16)
  b = jnp.asarray(np.random.default_rng(1).normal(size=(8192, 8192)), jnp.bfloat16)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * 16384 * 8192 * 8192 / float(np.median(times)) / 1e12


def _batch(cfg: Config, batch: int, route: str = "model") -> dict:
  """One step's batch [1, batch, L] of random tokens; route="uniform" adds forced routes
  drawn uniformly (`uniform_routes`) that the step replays instead of its router's."""
  L = cfg.train.seq_len
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.model.vocab_size, size=(1, batch, L + 1))
  out = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:],
         "loss_mask": np.ones((1, batch, L), np.float32),
         "segment_ids": np.zeros((1, batch, L), np.int32),
         "positions": np.broadcast_to(np.arange(L), (1, batch, L)).astype(np.int32)}
  if route == "uniform":
    e, g = uniform_routes(cfg, (1, batch, L), rng)
    out.update(forced_expert_ids=e, forced_group_ids=g)
  elif route != "model":
    raise ValueError(f"routing {route!r}: must be model or uniform")
  return out


def uniform_routes(cfg: Config, shape: tuple[int, ...], rng) -> tuple[np.ndarray, np.ndarray]:
  """Routes of every routed layer as a balanced router would give them on average:
  per token and layer, top_k_groups distinct groups uniformly, then top_k distinct experts
  uniformly among those groups' experts (MoE: top_k of its experts). int32 expert ids
  [*shape, R, K] and group ids [*shape, R, Kg]."""
  m = cfg.model
  R = sum(k != "dense" for k in m.ffn_kinds)
  G, N, Kg, K = m.num_groups, m.experts_per_group, m.top_k_groups, m.top_k
  n = int(np.prod(shape)) * R
  groups = np.argsort(rng.random((n, G), np.float32), axis=1)[:, :Kg]
  candidates = (groups[:, :, None] * N + np.arange(N)).reshape(n, Kg * N)
  pick = np.argsort(rng.random((n, Kg * N), np.float32), axis=1)[:, :K]
  experts = np.take_along_axis(candidates, pick, axis=1)
  return (experts.reshape(*shape, R, K).astype(np.int32),
          groups.reshape(*shape, R, Kg).astype(np.int32))


def balance(cfg: Config, expert_tokens_LxE: np.ndarray) -> dict:
  """Per-rank routed FLOPs of this step's routing on the expert axis, max/mean averaged
  over the routed layers, for the configured placement and (MoHGE) the other one."""
  m, ep = cfg.model, cfg.mesh.expert
  if ep <= 1 or not expert_tokens_LxE.size:
    return {}
  out = {}
  for strategy in ("all_size", "naive"):
    if strategy == "naive" and m.num_groups % ep:
      continue
    rep = allocation.balance_report(expert_tokens_LxE, m.group_widths, m.experts_per_group,
                                    ep, m.d_model, strategy)
    out[f"imbalance_{strategy}"] = float(np.mean(rep["flop_imbalance"]))
    out[f"rank_flops_{strategy}"] = rep["rank_flops"]
  out["imbalance"] = out[f"imbalance_{cfg.mesh.placement}"]
  return out


def run_one(cfg: Config, batch: int, reps: int, profile: str | None = None,
            gpus: int = 1, route: str = "model") -> dict:
  """Init, lower, compile and the first step timed apart (what a user waits for before
  training starts), then the median step time over `reps` steps. `batch` sequences per
  device, on the first `gpus` devices laid out as cfg.mesh."""
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:gpus])
  with jax.set_mesh(mesh):
    return _run_one(cfg, batch, reps, profile, mesh, route)


def _run_one(cfg, batch, reps, profile, mesh, route="model") -> dict:
  t = cfg.train
  gpus = mesh.devices.size
  T = time.perf_counter
  t0 = T()
  step = make_train_step(cfg, graph_def(cfg))
  target = abstract_state(cfg, mesh)
  state = jax.block_until_ready(jax.jit(
      make_init_fn(cfg), out_shardings=jax.tree.map(lambda a: a.sharding, target))())
  t1 = T()
  stage = lambda name: print(f"  stage: {name} ({T() - t0:.1f} s)", flush=True)  # noqa: E731
  stage("init")
  data = jax.device_put(_batch(cfg, batch * gpus, route),
                        sharding.batch_sharding(mesh, leading=1))
  lowered = step.lower(state, data)
  t2 = T()
  stage("lower")
  compiled = lowered.compile()
  t3 = T()
  stage("compile")
  state, metrics = compiled(state, data)
  jax.block_until_ready(metrics)
  t4 = T()
  startup = {"init_s": t1 - t0, "lower_s": t2 - t1, "compile_s": t3 - t2,
             "first_step_s": t4 - t3, "time_to_first_step_s": t4 - t1,
             "since_start_s": t4 - t0}
  print(f"  init {t1 - t0:.1f} s, lower {t2 - t1:.1f} s, compile {t3 - t2:.1f} s, first step "
        f"{t4 - t3:.1f} s", flush=True)
  state, metrics = compiled(state, data)  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(reps):
    t0 = T()
    state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    times.append(T() - t0)
  step_s = float(np.median(times))
  n_tokens = batch * gpus * t.seq_len
  expert_tokens = np.asarray(metrics.get("expert_tokens", np.zeros((0, 1))))
  flops_tok = model_flops_per_token(cfg, expert_tokens, n_tokens)
  stats = max((d.memory_stats() or {} for d in mesh.devices.flat),
              key=lambda s: s.get("peak_bytes_in_use", 0))
  if profile:  # the top device operations of two more steps
    from benchmarks import profile_summary as ps
    trace = ps.load_trace(ps.capture(compiled, state, data, logdir=profile, warmup=0, steps=2,
                                     carry=True))
    tot, hlo = ps.totals(trace), ps.hlo_op_names(compiled.as_text())
    for by, top in (("name", 40), ("source", 30), ("category", 10)):
      print(ps.format_table(ps.summarise(trace, top, by, hlo=hlo), tot), flush=True)
  return {"batch": batch, "seq": t.seq_len, "gpus": gpus, "routing": route,
          "mesh": {k: int(v) for k, v in mesh.shape.items() if v > 1},
          "gpu_a2a": cfg.mesh.gpu_a2a, "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "step_ms": 1e3 * step_s, "step_ms_all": [1e3 * x for x in times],
          "tokens_per_s": n_tokens / step_s, "tokens_per_s_per_gpu": n_tokens / step_s / gpus,
          "flops_per_token": flops_tok,
          "tflops": flops_tok * n_tokens / step_s / 1e12 / gpus, **startup,
          **balance(cfg, expert_tokens),
          "loss": float(metrics["loss"]), "finite": bool(np.isfinite(float(metrics["loss"]))),
          "peak_mem_gb": stats.get("peak_bytes_in_use", 0) / 2**30,
          "device_mem_gb": stats.get("bytes_limit", 0) / 2**30}


def _in_subprocess(path: str, batch: int, args, overrides: list[str], cache: str,
                   gpus: int = 1, profile: str | None = None,
                   timeout: float | None = None) -> dict | None:
  """One measurement in a fresh process (its own peak memory, its own compilation cache
  state); None when it ran out of memory. Past `timeout` seconds the child is killed and
  TimeoutError names the last stage it reached (the child prints each as it ends)."""
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache, PYTHONUNBUFFERED="1")
  cmd = [sys.executable, "-m", "benchmarks.train_step", "--one", path, "--batch", str(batch),
         "--seq", str(args.seq), "--reps", str(args.reps), "--gpus", str(gpus),
         "--routing", getattr(args, "routing", "model"), *overrides]
  if profile:  # only where the caller asks (multi_gpu: its first EP row, not every row)
    cmd += ["--profile", profile]
  try:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired as e:
    out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    sys.stdout.write(out)
    stages = [ln.split("stage: ", 1)[1] for ln in out.splitlines() if "stage: " in ln]
    raise TimeoutError(f"no result after {timeout:.0f} s; last stage done: "
                       f"{stages[-1] if stages else 'none (process start, imports)'}") from None
  sys.stdout.write(proc.stdout)
  if proc.returncode != 0:
    text = proc.stdout + proc.stderr
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
      oom = [ln for ln in text.splitlines() if "RESOURCE_EXHAUSTED" in ln or "memory" in ln.lower()]
      print(f"{path} batch {batch}: out of memory: {' | '.join(oom[:3])[:600]}", flush=True)
      return None
    sys.stderr.write(proc.stderr[-6000:])
    raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode})")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--configs", default="configs/mohge_3b.yaml,configs/moe_3b.yaml")
  ap.add_argument("--seq", type=int, default=4096)
  ap.add_argument("--batch", type=int, default=None)
  ap.add_argument("--find-batch", default="16,8,4,2,1")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--routing", default="model", choices=("model", "uniform"),
                  help="model: the router's own routing (random init: skewed); uniform: "
                       "every step replays routes drawn uniformly (a balanced router's "
                       "average), to time the system apart from the init's imbalance")
  ap.add_argument("--contrast", action="store_true",
                  help="also time each config with experts computed one at a time "
                       "(model.expert_backend=per_expert, the paper's reference's way)")
  ap.add_argument("--warm", action="store_true",
                  help="also time the start-up again with the compilation cache filled")
  ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--gpus", type=int, default=1, help=argparse.SUPPRESS)
  ap.add_argument("--profile", default=None,
                  help="trace two more steps into this directory and print the top operations")
  ap.add_argument("--out", default=None)
  ap.add_argument("overrides", nargs="*")
  args = ap.parse_args()

  if args.one:  # the child process of _in_subprocess
    cfg = load_config(args.one, [f"train.seq_len={args.seq}", f"train.batch_size={args.batch}",
                                 "train.grad_accum=1", *args.overrides])
    collectives.use_gpu_a2a(cfg.mesh.gpu_a2a)  # before the backend starts
    row = run_one(cfg, args.batch, args.reps, args.profile, args.gpus, args.routing)
    row.update(dense_tflops=dense_rate_tflops(args.reps), device=jax.devices()[0].device_kind)
    print(json.dumps(row), flush=True)
    return

  # This process never touches the device: each measurement's process has it to itself
  # (jax takes most of the device memory at start).
  rows = []
  for path in args.configs.split(","):
    batches = [args.batch] if args.batch else [int(b) for b in args.find_batch.split(",")]
    for b in batches:
      cache = tempfile.mkdtemp(prefix="mohge_bench_xla_cache_")  # cold: empty cache
      print(f"{path} batch {b} (cold compilation cache)", flush=True)
      profile = args.profile and os.path.join(args.profile, os.path.basename(path).split(".")[0])
      row = _in_subprocess(path, b, args, args.overrides, cache, profile=profile)
      if row is None:
        continue
      row.update(config=path, mfu=row["tflops"] / PEAK_TFLOPS,
                 mfu_vs_measured_dense=row["tflops"] / row["dense_tflops"])
      if args.warm:
        print(f"{path} batch {b} (warm compilation cache)", flush=True)
        warm = _in_subprocess(path, b, args, args.overrides, cache)
        row.update({f"warm_{k}": warm[k] for k in ("init_s", "lower_s", "compile_s",
                                                  "first_step_s", "time_to_first_step_s")})
      if args.contrast:
        slow = _in_subprocess(path, b, args, [*args.overrides, "model.expert_backend=per_expert"],
                              cache)
        row["per_expert_tokens_per_s"] = slow["tokens_per_s"]
        row["speedup_vs_per_expert"] = row["tokens_per_s"] / slow["tokens_per_s"]
      rows.append(row)
      print(json.dumps(row), flush=True)
      break
  print(f"\n{'config':<24}{'batch':>6}{'first step s':>13}{'warm s':>8}{'step ms':>10}"
        f"{'tokens/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'vs dense':>9}{'peak GB':>9}")
  for r in rows:
    warm = f"{r['warm_time_to_first_step_s']:>8.1f}" if "warm_init_s" in r else f"{'-':>8}"
    print(f"{r['config']:<24}{r['batch']:>6}{r['time_to_first_step_s']:>13.1f}{warm}"
          f"{r['step_ms']:>10.1f}{r['tokens_per_s']:>11,.0f}"
          f"{r['tflops']:>9.1f}{r['mfu']:>7.1%}{r['mfu_vs_measured_dense']:>9.1%}"
          f"{r['peak_mem_gb']:>9.1f}"
          + (f"  {r['speedup_vs_per_expert']:.1f}x per-expert" if "speedup_vs_per_expert" in r
             else ""))
  if args.out:
    with open(args.out, "w") as fh:
      json.dump({"device": rows[0]["device"] if rows else None, "jax_version": jax.__version__,
                 "date": datetime.date.today().isoformat(),
                 "peak_tflops": PEAK_TFLOPS, "overrides": args.overrides, "rows": rows},
                fh, indent=1)


if __name__ == "__main__":
  main()
