"""How much consecutive queries' DSA selections share (issue 16: whether the backward
kernel's adds into the keys' gradients could be merged across a group of queries).

    python -m benchmarks.dsa_overlap [--seq 16384] [--topk 2048] [--out PATH]

The selection is benchmarks/dsa.py's own (its random inputs, `select_topk`, top-2048). For
groups of n = 2, 4, 8, 16 consecutive queries (200 groups drawn past the first top-k
queries): the size of the union of their selected keys over one query's set (n when they
share nothing, 1 when they share all), median and mean; and how many queries choose each
key (quantiles). Runs on CPU (~30 s at 16k); prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from benchmarks import dsa as bench
from mohge_jax import sparse_attention as dsa


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--seq", type=int, default=16384)
  ap.add_argument("--topk", type=int, default=bench.TOPK)
  ap.add_argument("--groups", type=int, default=200)
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                "dsa_overlap.json"))
  args = ap.parse_args()
  if args.seq <= args.topk + 16:
    raise SystemExit(f"--seq must exceed top-k + 16 = {args.topk + 16}, got {args.seq}")
  x = bench.inputs(args.seq)
  t0 = time.perf_counter()
  idx, valid = jax.jit(lambda a, b, c: dsa.select_topk(
      a, b, c, topk=args.topk, chunk=min(bench.CHUNK, args.topk))[:2])(x["q_I"], x["w_I"], x["k_I"])
  idx, valid = np.asarray(idx[0]), np.asarray(valid[0])
  print(f"selected {idx.shape} in {time.perf_counter() - t0:.1f} s", flush=True)
  rng = np.random.default_rng(0)
  rows = []
  print("| queries n | union / one set, median | mean | sharing nothing |")
  print("| ---: | ---: | ---: | ---: |")
  for n in (2, 4, 8, 16):
    ratios = []
    for start in rng.integers(args.topk, args.seq - n, size=args.groups):
      sets = [set(idx[t][valid[t]].tolist()) for t in range(start, start + n)]
      ratios.append(len(set().union(*sets)) / np.mean([len(s) for s in sets]))
    rows.append(dict(n=n, union_over_one_median=float(np.median(ratios)),
                     union_over_one_mean=float(np.mean(ratios))))
    print(f"| {n} | {np.median(ratios):.2f} | {np.mean(ratios):.2f} | {n} |")
  counts = np.bincount(idx[valid].ravel(), minlength=args.seq)
  qs = (0.5, 0.9, 0.99, 1.0)
  chosen_by = {str(q): float(v) for q, v in zip(qs, np.quantile(counts, qs))}
  print("queries choosing a key, quantiles:", chosen_by)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as fh:
    json.dump(dict(seq=args.seq, topk=args.topk, groups=args.groups, rows=rows,
                   queries_choosing_a_key=chosen_by), fh, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
