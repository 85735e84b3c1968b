"""Training-step throughput: the real jit-compiled step (forward, backward, AdamW update).

    python -m benchmarks.train_step [--configs configs/mohge_3b.yaml,configs/moe_3b.yaml]
        [--seq 4096] [--batch 8 | --find-batch 16,8,4,2,1] [--reps 5] [--out FILE.json]
        [key=value ...]   # overrides for every config, e.g. model.remat=save_dots

Per config: step time (median of repeats after warm-up), tokens/s, model FLOPs per token,
MFU against the H200's 989 TFLOP/s dense bf16 peak and against the dense matmul rate
measured in the same run, and peak device memory (the process high-water mark: run one
config per process for exact per-config peaks). `--find-batch` tries per-device batch
sizes from the first and keeps the largest that compiles and runs.

Model FLOPs per token (training = 3 x forward = 6 x matmul parameters):
  6 * (non-embedding matmul parameters, routed experts excluded)
  + 6 * 3 * d * sum over routed pairs of the expert's width / tokens   (actual routing)
  + per layer 3 * 2 * (S/2) * H * (d_qk + d_v)                          (causal attention)
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from mohge_jax import params as params_lib
from mohge_jax.config import Config, load_config
from mohge_jax.trainer import graph_def, make_init_fn, make_train_step

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


def run_one(cfg: Config, batch: int, reps: int) -> dict:
  t = cfg.train
  graphdef = graph_def(cfg)
  step = make_train_step(cfg, graphdef)
  state = jax.jit(make_init_fn(cfg))()
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.model.vocab_size, size=(1, batch, t.seq_len + 1))
  data = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:],
          "loss_mask": np.ones((1, batch, t.seq_len), np.float32),
          "segment_ids": np.zeros((1, batch, t.seq_len), np.int32),
          "positions": np.broadcast_to(np.arange(t.seq_len), (1, batch, t.seq_len)).astype(np.int32)}
  data = jax.device_put(data)
  t0 = time.perf_counter()
  state, metrics = step(state, data)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  state, metrics = step(state, data)  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    state, metrics = step(state, data)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))
  n_tokens = batch * t.seq_len
  expert_tokens = np.asarray(metrics.get("expert_tokens", np.zeros((0, 1))))
  flops_tok = model_flops_per_token(cfg, expert_tokens, n_tokens)
  stats = jax.devices()[0].memory_stats() or {}
  return {"batch": batch, "seq": t.seq_len, "step_ms": 1e3 * step_s,
          "tokens_per_s": n_tokens / step_s, "flops_per_token": flops_tok,
          "tflops": flops_tok * n_tokens / step_s / 1e12, "compile_s": compile_s,
          "loss": float(metrics["loss"]), "finite": bool(np.isfinite(float(metrics["loss"]))),
          "peak_mem_gb": stats.get("peak_bytes_in_use", 0) / 2**30}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--configs", default="configs/mohge_3b.yaml,configs/moe_3b.yaml")
  ap.add_argument("--seq", type=int, default=4096)
  ap.add_argument("--batch", type=int, default=None)
  ap.add_argument("--find-batch", default="16,8,4,2,1")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--contrast", action="store_true",
                  help="also time each config with experts computed one at a time "
                       "(model.expert_backend=per_expert, the paper's reference's way)")
  ap.add_argument("--out", default=None)
  ap.add_argument("overrides", nargs="*")
  args = ap.parse_args()

  dense = dense_rate_tflops(args.reps)
  print(f"device {jax.devices()[0].device_kind}; dense bf16 matmul {dense:.0f} TFLOP/s", flush=True)
  rows = []
  for path in args.configs.split(","):
    batches = [args.batch] if args.batch else [int(b) for b in args.find_batch.split(",")]
    for b in batches:
      cfg = load_config(path, [f"train.seq_len={args.seq}", f"train.batch_size={b}",
                               "train.grad_accum=1", *args.overrides])
      try:
        row = run_one(cfg, b, args.reps)
      except Exception as e:  # out of memory: try the next smaller batch
        if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
          raise
        print(f"{path} batch {b}: out of memory", flush=True)
        continue
      row.update(config=path, mfu=row["tflops"] / PEAK_TFLOPS,
                 mfu_vs_measured_dense=row["tflops"] / dense)
      if args.contrast:
        slow = run_one(load_config(path, [f"train.seq_len={args.seq}", f"train.batch_size={b}",
                                          "train.grad_accum=1", *args.overrides,
                                          "model.expert_backend=per_expert"]), b, args.reps)
        row["per_expert_tokens_per_s"] = slow["tokens_per_s"]
        row["speedup_vs_per_expert"] = row["tokens_per_s"] / slow["tokens_per_s"]
      rows.append(row)
      print(json.dumps(row), flush=True)
      break
  print(f"\n{'config':<24}{'batch':>6}{'step ms':>10}{'tokens/s':>11}{'TFLOP/s':>9}"
        f"{'MFU':>7}{'vs dense':>9}{'peak GB':>9}")
  for r in rows:
    print(f"{r['config']:<24}{r['batch']:>6}{r['step_ms']:>10.1f}{r['tokens_per_s']:>11,.0f}"
          f"{r['tflops']:>9.1f}{r['mfu']:>7.1%}{r['mfu_vs_measured_dense']:>9.1%}"
          f"{r['peak_mem_gb']:>9.1f}"
          + (f"  {r['speedup_vs_per_expert']:.1f}x per-expert" if "speedup_vs_per_expert" in r
             else ""))
  if args.out:
    with open(args.out, "w") as fh:
      json.dump({"device": jax.devices()[0].device_kind, "jax_version": jax.__version__,
                 "date": datetime.date.today().isoformat(), "dense_tflops": dense,
                 "peak_tflops": PEAK_TFLOPS, "overrides": args.overrides, "rows": rows},
                fh, indent=1)


if __name__ == "__main__":
  main()
