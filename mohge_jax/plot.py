"""Plot a run: `python -m mohge_jax.plot WORKDIR [--out FILE.png]`.

Draws, from WORKDIR/metrics.jsonl: training and validation loss, the auxiliary losses,
the share of routed tokens per expert group, and the routed FLOPs of every expert-parallel
rank (relative to the mean) over training. Default output:
WORKDIR/plots.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(workdir: Path) -> list[dict]:
  path = workdir / "metrics.jsonl"
  if not path.is_file():
    raise FileNotFoundError(f"{path} does not exist: is {workdir} a training workdir?")
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  if not rows:
    raise ValueError(f"{path} is empty: nothing logged yet")
  return rows


def _series(rows: list[dict], key: str):
  pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
  return [p[0] for p in pts], [p[1] for p in pts]


def plot(workdir: str | Path, out: str | Path | None = None) -> Path:
  workdir = Path(workdir)
  rows = read_metrics(workdir)
  out = Path(out) if out else workdir / "plots.png"
  fig, (ax_loss, ax_aux, ax_share, ax_rank) = plt.subplots(1, 4, figsize=(21, 4.5))

  for key, label in (("loss", "train loss (total)"), ("lm_loss", "train LM loss"),
                     ("val_loss", "validation loss")):
    x, y = _series(rows, key)
    if x:
      ax_loss.plot(x, y, label=label, marker="o" if key == "val_loss" else None)
  ax_loss.set(xlabel="step", ylabel="loss", title="Loss")
  ax_loss.legend()

  for key in ("group_aux", "expert_aux", "z_loss"):
    x, y = _series(rows, key)
    pts = [(a, b) for a, b in zip(x, y) if b > 0]  # log scale; group_aux is 0 until it starts
    if pts:
      ax_aux.plot(*zip(*pts), label=key)
  ax_aux.set(xlabel="step", title="Auxiliary losses", yscale="log")
  if ax_aux.lines:
    ax_aux.legend()

  shares = [(r["step"], r["group_share"]) for r in rows if "group_share" in r]
  if shares:
    steps = [s for s, _ in shares]
    G = len(shares[0][1])
    stacked = [[v[g] for _, v in shares] for g in range(G)]
    ax_share.stackplot(steps, stacked, labels=[f"group {g}" for g in range(G)])
    ax_share.set(xlabel="step", ylabel="share of routed tokens", ylim=(0, 1),
                 title="Routed tokens per expert group (small to large)")
    ax_share.legend(loc="upper left", fontsize="small", ncol=2)
  else:
    ax_share.set_title("no routed layers")
  loads = [(r["step"], r["ep_rank_flops"]) for r in rows if "ep_rank_flops" in r]
  if loads:
    steps = [s for s, _ in loads]
    R = len(loads[0][1])
    for rank in range(R):
      ax_rank.plot(steps, [v[rank] / (sum(v) / R) for _, v in loads], label=f"rank {rank}")
    naive = [(r["step"], max(r["ep_naive_flop_imbalance"])) for r in rows
             if "ep_naive_flop_imbalance" in r]
    if naive:
      ax_rank.plot(*zip(*naive), "k--", label="naive: worst layer max/mean")
    ax_rank.axhline(1.0, color="grey", lw=0.5)
    ax_rank.set(xlabel="step", ylabel="routed FLOPs / mean",
                title=f"Per-rank expert load (EP={R})")
    ax_rank.legend(fontsize="small", ncol=2)
  else:
    ax_rank.set_title("no routed layers")
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("workdir")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  try:
    print(f"wrote {plot(args.workdir, args.out)}")
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
