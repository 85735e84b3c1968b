"""Expert placement over expert-parallel (EP) ranks (spec §4).

`all_size`: the All-size Group-decoupling Allocation. Groups are interleaved small/large
(0, G-1, 1, G-2, ...), and that order is repeated N times: block j holds the j-th expert of
every group. Ranks take contiguous slices of this physical order, so with EP = N every rank
holds one expert of every width. `naive`: the logical (group-major) order, so ranks hold
whole groups.

    p = place((384, 512, ..., 1280), experts_per_group=8, ep=8)
    p.experts_by_rank[r]   # logical expert ids on rank r
    rank_params(p, widths, 8, d_model=1024)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

STRATEGIES = ("all_size", "naive")


@dataclasses.dataclass(frozen=True)
class Placement:
  strategy: str
  ep: int
  order: tuple[int, ...]  # physical slot -> logical expert id

  @property
  def experts_per_rank(self) -> int:
    return len(self.order) // self.ep

  @property
  def experts_by_rank(self) -> tuple[tuple[int, ...], ...]:
    n = self.experts_per_rank
    return tuple(self.order[r * n:(r + 1) * n] for r in range(self.ep))

  @property
  def slot_of_expert(self) -> tuple[int, ...]:
    """Logical expert id -> physical slot (inverse of `order`)."""
    inv = np.empty(len(self.order), np.int64)
    inv[list(self.order)] = np.arange(len(self.order))
    return tuple(int(i) for i in inv)

  @property
  def rank_of_expert(self) -> tuple[int, ...]:
    n = self.experts_per_rank
    return tuple(s // n for s in self.slot_of_expert)


def interleaved_groups(num_groups: int) -> list[int]:
  """0, G-1, 1, G-2, ...: adjacent pairs of smallest and largest widths."""
  lo, hi, out = 0, num_groups - 1, []
  while lo <= hi:
    out.append(lo)
    if lo != hi:
      out.append(hi)
    lo, hi = lo + 1, hi - 1
  return out


def place(widths: Sequence[int], experts_per_group: int, ep: int,
          strategy: str = "all_size") -> Placement:
  G, N = len(widths), experts_per_group
  E = G * N
  if strategy not in STRATEGIES:
    raise ValueError(f"allocation strategy {strategy!r}: must be one of {', '.join(STRATEGIES)}")
  if ep < 1 or E % ep:
    raise ValueError(f"expert-parallel size {ep} must divide the number of experts {E} "
                     f"({G} groups x {N})")
  if strategy == "naive":
    order = list(range(E))
  else:
    groups = interleaved_groups(G)
    order = [g * N + j for j in range(N) for g in groups]
  return Placement(strategy=strategy, ep=ep, order=tuple(order))


def expert_widths(widths: Sequence[int], experts_per_group: int) -> np.ndarray:
  """[E] width of every logical expert."""
  return np.repeat(np.asarray(widths, np.int64), experts_per_group)


def rank_width_sums(p: Placement, widths: Sequence[int], experts_per_group: int) -> np.ndarray:
  w_E = expert_widths(widths, experts_per_group)
  return np.array([w_E[list(ids)].sum() for ids in p.experts_by_rank])


def rank_params(p: Placement, widths: Sequence[int], experts_per_group: int,
                d_model: int) -> np.ndarray:
  """[ep] routed-expert parameters per rank (SwiGLU: 3 * d * W per expert)."""
  return 3 * d_model * rank_width_sums(p, widths, experts_per_group)


def rank_tokens(p: Placement, tokens_per_expert: np.ndarray) -> np.ndarray:
  """[ep] routed token-expert pairs per rank, from [E] counts (logical order)."""
  t = np.asarray(tokens_per_expert)
  return np.array([t[list(ids)].sum() for ids in p.experts_by_rank])


def rank_flops(p: Placement, widths: Sequence[int], experts_per_group: int,
               tokens_per_expert: np.ndarray, d_model: int) -> np.ndarray:
  """[ep] routed FLOPs per rank: rows x width x 6*d, the three matmuls' forward FLOPs
  (a training step does 3x this; ratios between ranks are the same)."""
  work_E = np.asarray(tokens_per_expert, np.float64) * expert_widths(widths, experts_per_group)
  return np.array([6.0 * d_model * work_E[list(ids)].sum() for ids in p.experts_by_rank])


def imbalance(per_rank: np.ndarray) -> float:
  """max / mean (1.0 is perfect balance)."""
  per_rank = np.asarray(per_rank, np.float64)
  mean = per_rank.mean()
  return float(per_rank.max() / mean) if mean > 0 else 1.0


def balance_report(expert_tokens_LxE: np.ndarray, widths: Sequence[int], experts_per_group: int,
                   ep: int, d_model: int, strategy: str = "all_size") -> dict[str, list]:
  """Per-rank load of routed layers for a placement: token-expert pairs and routed FLOPs
  per rank (summed over layers) and the max/mean imbalance of each layer."""
  p = place(widths, experts_per_group, ep, strategy)
  tokens_LxR = np.stack([rank_tokens(p, t) for t in expert_tokens_LxE])
  flops_LxR = np.stack([rank_flops(p, widths, experts_per_group, t, d_model)
                        for t in expert_tokens_LxE])
  return {
      "rank_tokens": tokens_LxR.sum(0).tolist(),
      "rank_flops": flops_LxR.sum(0).tolist(),
      "token_imbalance": [imbalance(t) for t in tokens_LxR],
      "flop_imbalance": [imbalance(f) for f in flops_LxR],
  }
