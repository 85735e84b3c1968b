"""Expert parallelism's throughput on several GPUs of one host against one GPU.

    python -m benchmarks.multi_gpu [--configs configs/mohge_3b.yaml,configs/moe_3b.yaml]
        [--gpus 2] [--batch 32] [--seq 4096] [--reps 3] [--rows all] [--a2a decomposed,nccl]
        [--routing model|uniform] [--row-timeout 300] [--profile DIR]
        [--out benchmarks/results/multi_gpu_h200x2.json] [key=value ...]

Per config, each in its own process (`benchmarks.train_step --one`, cold compilation
cache): one GPU, then `--gpus` GPUs with the experts split over them (mesh.expert = gpus)
for the exchanges (ragged all-to-all, all-gather) and placements (all-size; naive: whole
groups per GPU, MoHGE only), and data parallelism with replicated experts (mesh.data =
gpus) as the no-exchange contrast. `--batch` sequences per GPU in every row, so tokens/s
per GPU compares equal work per GPU. Rows: config, gpus, mesh, placement, exchange,
tokens/s per GPU, step time, time to first step, and `imbalance`: per-GPU routed FLOPs
max/mean of that step's routing for the row's placement (averaged over routed layers;
`imbalance_all_size` / `imbalance_naive` give both placements for the same routing).
`--profile DIR` traces the first EP row of each config and prints the top device
operations (the exchanges are `ragged-all-to-all`, `all-gather`, `reduce-scatter`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile

import jax

from benchmarks import train_step


def plans(cfg_path: str, gpus: int, a2a: tuple[str, ...] = ("decomposed",)
          ) -> list[tuple[str, int, list[str]]]:
  from mohge_jax.config import load_config
  m = load_config(cfg_path).model
  rows = [("1 GPU", 1, [])]
  ep = [f"mesh.expert={gpus}", "mesh.data=1"]
  for kind in a2a:  # how XLA:GPU runs the ragged exchange (mesh.gpu_a2a)
    rows.append((f"EP{gpus} all_to_all all_size" + (f" ({kind})" if len(a2a) > 1 else ""),
                 gpus, ep + ["mesh.expert_comm=all_to_all", "mesh.placement=all_size",
                             f"mesh.gpu_a2a={kind}"]))
  rows.append((f"EP{gpus} all_gather all_size", gpus,
               ep + ["mesh.expert_comm=all_gather", "mesh.placement=all_size"]))
  if m.num_groups % gpus == 0 and m.num_groups > 1:
    for comm in ("all_gather", "all_to_all"):
      rows.append((f"EP{gpus} {comm} naive", gpus,
                   ep + [f"mesh.expert_comm={comm}", "mesh.placement=naive"]))
  rows.append((f"DP{gpus} (experts replicated)", gpus, [f"mesh.data={gpus}", "mesh.expert=1"]))
  return rows


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--configs", default="configs/mohge_3b.yaml,configs/moe_3b.yaml")
  ap.add_argument("--gpus", type=int, default=2)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--seq", type=int, default=4096)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--a2a", default="decomposed",
                  help="comma-separated mesh.gpu_a2a kinds for the all-size all-to-all rows "
                       "(decomposed, nccl, one_shot); the other rows use the first")
  ap.add_argument("--rows", default="all",
                  help="comma-separated row names' prefixes to run (e.g. '1 GPU,EP2 all_to_all')")
  ap.add_argument("--routing", default="model", choices=("model", "uniform"),
                  help="benchmarks.train_step --routing: the router's own routes, or every "
                       "row replaying routes drawn uniformly (balanced routing)")
  ap.add_argument("--row-timeout", type=float, default=300.0,
                  help="seconds a row may take (start to result) before it is killed and "
                       "recorded as an error row naming its last stage; the next row runs")
  ap.add_argument("--profile", default=None)
  ap.add_argument("--out", default=None)
  ap.add_argument("overrides", nargs="*")
  args = ap.parse_args()
  args.warm = args.contrast = False
  if jax.device_count() < args.gpus:  # jax in this process only counts devices
    raise SystemExit(f"--gpus {args.gpus}: found {jax.device_count()} devices")
  rows = []
  for path in args.configs.split(","):
    profiled = False
    a2a = tuple(args.a2a.split(","))
    for name, gpus, overrides in plans(path, args.gpus, a2a):
      overrides = [f"mesh.gpu_a2a={a2a[0]}", *overrides]  # later overrides win
      if args.rows != "all" and not any(name.startswith(r) for r in args.rows.split(",")):
        continue
      profile = None
      if args.profile and gpus > 1 and not profiled:
        profile, profiled = os.path.join(args.profile, os.path.basename(path).split(".")[0]), True
      print(f"== {path}: {name}", flush=True)
      comm = next((o.split("=")[1] for o in overrides if "expert_comm" in o), None)
      place = next((o.split("=")[1] for o in overrides if "placement" in o), None)
      ident = dict(config=path, name=name, gpus=gpus, exchange=comm if gpus > 1 and comm else None,
                   placement=place, gpu_a2a=next(o.split("=")[1] for o in reversed(overrides)
                                                 if o.startswith("mesh.gpu_a2a=")))
      try:
        r = train_step._in_subprocess(path, args.batch, args, [*args.overrides, *overrides],
                                      tempfile.mkdtemp(prefix="mohge_xla_"), gpus, profile,
                                      timeout=args.row_timeout)
      except (TimeoutError, RuntimeError) as e:  # recorded; the next row runs
        r = dict(ident, error=str(e)[-600:])
      if r is None:
        r = dict(ident, error=f"out of memory at batch {args.batch} per GPU")
      r.update(ident)
      rows.append(r)
      print(json.dumps({k: v for k, v in r.items() if not k.startswith("rank_")}), flush=True)
      save(args, rows)  # after every row: a call cut short keeps what it measured
  print(f"\n{'config':<22}{'row':<30}{'step ms':>9}{'tok/s/GPU':>11}{'vs 1 GPU':>9}"
        f"{'first step s':>13}{'imbalance':>10}{'peak GB':>9}")
  for r in rows:
    if "error" in r:
      print(f"{os.path.basename(r['config']):<22}{r['name']:<30} error: {r['error'][:200]}")
      continue
    one = next((x for x in rows if x["config"] == r["config"] and x["gpus"] == 1
                and "error" not in x), None)
    r["per_gpu_vs_one_gpu"] = r["tokens_per_s_per_gpu"] / one["tokens_per_s_per_gpu"] if one else None
    imb = f"{r['imbalance']:.3f}" if "imbalance" in r else "-"
    print(f"{os.path.basename(r['config']):<22}{r['name']:<30}{r['step_ms']:>9.1f}"
          f"{r['tokens_per_s_per_gpu']:>11,.0f}"
          f"{(r['per_gpu_vs_one_gpu'] or 0):>9.3f}{r['time_to_first_step_s']:>13.1f}{imb:>10}"
          f"{r['peak_mem_gb']:>9.1f}")
  save(args, rows)


def save(args, rows: list[dict]) -> None:
  if args.out:
    with open(args.out, "w") as fh:
      json.dump({"device": next((r["device"] for r in rows if "device" in r), None),
                 "jax_version": jax.__version__,
                 "date": datetime.date.today().isoformat(), "batch_per_gpu": args.batch,
                 "seq": args.seq, "overrides": args.overrides, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
  main()
