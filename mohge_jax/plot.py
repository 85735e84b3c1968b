"""Plot a run: `python -m mohge_jax.plot WORKDIR [--out FILE.png]`.

Draws, from WORKDIR/metrics.jsonl: training and validation loss, the auxiliary losses,
the share of routed tokens per expert group, and the routed FLOPs of every expert-parallel
rank (relative to the mean) over training. Default output:
WORKDIR/plots.png.

Several runs side by side (benchmarks/replicate.py): `plot_loss_comparison` (validation
and training loss of every run against tokens seen) and `plot_group_shares` (each MoHGE
run's token share per expert group and mean routed expert width over training).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
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


def plot_rl(workdir: str | Path, out: str | Path | None = None) -> Path:
  """A GRPO run (mohge_jax.rl): reward and accuracy, KL and clip fraction, response length
  and the SFT warm-up's loss, against the step. Default output: WORKDIR/rl_plots.png."""
  workdir = Path(workdir)
  rows = read_metrics(workdir)
  out = Path(out) if out else workdir / "rl_plots.png"
  fig, (ax_r, ax_kl, ax_len, ax_sft) = plt.subplots(1, 4, figsize=(21, 4.5))
  for key in ("reward_mean", "accuracy", "format_rate"):
    x, y = _series(rows, key)
    if x:
      ax_r.plot(x, y, label=key)
  ax_r.set(xlabel="step", title="Reward (GRPO)")
  for key in ("kl", "clip_fraction", "masked_sequence_fraction"):
    x, y = _series(rows, key)
    if x:
      ax_kl.plot(x, y, label=key)
  ax_kl.set(xlabel="step", title="KL to the reference, clipping, masking")
  x, y = _series(rows, "response_length")
  if x:
    ax_len.plot(x, y)
  ax_len.set(xlabel="step", ylabel="tokens", title="Response length")
  x, y = _series(rows, "sft_loss")
  if x:
    ax_sft.plot(x, y)
  ax_sft.set(xlabel="step", ylabel="loss", title="SFT warm-up loss (answer tokens)")
  for ax in (ax_r, ax_kl):
    if ax.lines:
      ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out


# Runs of several models and seeds: {model name: {seed: metrics rows}}.
Runs = Mapping[str, Mapping[int, list[dict]]]
_SEED_STYLES = ("-", "--", ":", "-.")


def _tokens(steps, tokens_per_step):
  return [s * tokens_per_step / 1e6 for s in steps]


def plot_loss_comparison(runs: Runs, out: str | Path, *, tokens_per_step: int,
                         title: str = "") -> Path:
  """Validation loss (left) and training LM loss (right) of every run against tokens
  seen; one colour per model, one line style per seed."""
  out = Path(out)
  fig, (ax_val, ax_train) = plt.subplots(1, 2, figsize=(14, 5))
  for color, (model, by_seed) in zip(_colors(), runs.items()):
    for i, (seed, rows) in enumerate(sorted(by_seed.items())):
      style = _SEED_STYLES[i % len(_SEED_STYLES)]
      label = f"{model} (seed {seed})"
      x, y = _series(rows, "val_loss")
      if x:
        ax_val.plot(_tokens(x, tokens_per_step), y, style, color=color, marker="o", ms=3,
                    label=label)
      x, y = _series(rows, "lm_loss")
      if x:
        ax_train.plot(_tokens(x, tokens_per_step), y, style, color=color, lw=1, label=label)
  for ax, what, name in ((ax_val, "validation loss", "Validation loss"),
                         (ax_train, "training LM loss", "Training LM loss")):
    ax.set(xlabel="tokens seen (millions)", ylabel=what, title=name)
    ax.grid(alpha=0.3)
    ax.locator_params(axis="x", nbins=6)
    if ax.lines:
      ax.legend(fontsize="small")
      _zoom(ax)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out


def plot_group_shares(runs: Runs, widths: Sequence[int], out: str | Path, *,
                      tokens_per_step: int, group_aux_start: Mapping[str, int] | None = None,
                      title: str = "") -> Path:
  """One panel per MoHGE run: the share of routed token-expert pairs per expert group
  (stacked, smallest group at the bottom) over training, the Group-Wise loss' start
  marked; last panel: the mean routed expert width (sum over groups of share x width)."""
  out = Path(out)
  panels = [(model, seed, rows) for model, by_seed in runs.items()
            for seed, rows in sorted(by_seed.items())]
  fig, axes = plt.subplots(1, len(panels) + 1, figsize=(5 * (len(panels) + 1), 4.5),
                           squeeze=False)
  ax_width = axes[0, -1]
  for ax, color, (model, seed, rows) in zip(axes[0], _colors(), panels):
    shares = [(r["step"], r["group_share"]) for r in rows if "group_share" in r]
    if not shares:
      ax.set_title(f"{model} (seed {seed}): no routed layers")
      continue
    x = _tokens([s for s, _ in shares], tokens_per_step)
    G = len(shares[0][1])
    ax.stackplot(x, [[v[g] for _, v in shares] for g in range(G)],
                 labels=[f"width {w}" for w in widths[:G]])
    start = (group_aux_start or {}).get(model)
    if start is not None:
      ax.axvline(start * tokens_per_step / 1e6, color="k", ls="--", lw=1,
                 label="Group-Wise loss on")
    ax.set(xlabel="tokens seen (millions)", ylabel="share of routed token-expert pairs",
           ylim=(0, 1), title=f"{model} (seed {seed})")
    ax.locator_params(axis="x", nbins=5)
    mean_width = [sum(p * w for p, w in zip(v, widths)) for _, v in shares]
    ax_width.plot(x, mean_width, color=color, label=f"{model} (seed {seed})")
  ax_width.axhline(sum(widths) / len(widths), color="grey", lw=0.8, ls=":",
                   label="uniform over groups")
  ax_width.set(xlabel="tokens seen (millions)", ylabel="width",
               title="Mean routed expert width per pair")
  ax_width.locator_params(axis="x", nbins=5)
  ax_width.legend(fontsize="small")
  handles = {}
  for ax in axes[0, :-1]:  # one legend for the group colours (and the start line)
    for h, label in zip(*ax.get_legend_handles_labels()):
      handles.setdefault(label, h)
  fig.legend(list(handles.values()), list(handles), loc="lower center",
             ncol=len(handles), fontsize="small")
  if title:
    fig.suptitle(title)
  fig.tight_layout(rect=(0, 0.07, 1, 1))
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out


def _colors():
  return plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4


def _zoom(ax) -> None:
  """Losses fall fast at first: cut the top so that the differences where the curves
  end are visible."""
  ends = [line.get_ydata()[-1] for line in ax.lines if len(line.get_ydata())]
  ys = [y for line in ax.lines for y in line.get_ydata()]
  if ends and ys:
    lo, hi = min(ys), max(ys)
    top = min(hi, max(ends) + max(3 * (max(ends) - lo), 0.3 * (hi - lo)))
    pad = 0.02 * (top - lo) + 1e-3
    ax.set_ylim(lo - pad, top + pad)


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
