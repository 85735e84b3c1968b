"""Routing: MoHGE's two-level router (spec §2) and the homogeneous top-K baseline.

All router math runs in float32. Letters: T tokens, G groups, N experts per group,
E = G*N experts (group-major: expert n of group g is g*N + n), Kg groups and K experts
chosen per token.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Routing(NamedTuple):
  expert_ids: jax.Array  # [T, K] int32, logical expert ids (group-major)
  weights: jax.Array  # [T, K] float32 combine weights
  group_ids: jax.Array  # [T, Kg] int32 chosen groups
  group_probs: jax.Array  # [T, G] float32 p: renormalised sigmoid scores, 0 if unselected
  group_softmax: jax.Array  # [T, G] float32 S = softmax(u) (Group-Wise loss)
  expert_probs: jax.Array  # [T, E] float32 P: combine weight if chosen, else 0 (Intra-Group loss)
  router_probs: jax.Array  # [T, E] float32 r: masked combined scores (full softmax for MoE)


class Forced(NamedTuple):
  """A routing to replay (GRPO's keep routing): the ids recorded when the tokens were
  sampled. Any leading axes ([T, ...] here; [layers, B, L, ...] through the model)."""
  expert_ids: jax.Array  # [..., K] int32
  group_ids: jax.Array  # [..., Kg] int32 (two-level routing; ignored by top-K)


def router_logits(x_TxD: jax.Array, w_DxL: jax.Array) -> jax.Array:
  """The router's logits x @ w, float32 [T, L], at float32 precision on every backend.
  jnp's DEFAULT precision lets XLA round float32 operands to TF32 (10-bit mantissas) on
  NVIDIA GPUs and to bfloat16 on TPUs (https://docs.jax.dev/en/latest/201/precision.html):
  the router's weights would be used at ~3 decimal digits and its top-k choices would
  follow those roundings. HIGHEST is true float32 on a GPU, its float32 emulation (six
  bf16 passes) on a TPU; the product ([T, D] x [D, G + E]) is small beside the layer's others."""
  return jnp.matmul(x_TxD.astype(jnp.float32), w_DxL.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


def combine(scores_TxK: jax.Array, mode: str) -> jax.Array:
  """Final combine weights from the selected scores (spec §2 step 5)."""
  if mode == "softmax":
    return jax.nn.softmax(scores_TxK, axis=-1)
  if mode == "renormalize":
    return scores_TxK / jnp.sum(scores_TxK, axis=-1, keepdims=True)
  if mode == "raw":
    return scores_TxK
  raise ValueError(f"combine_weights={mode!r}: must be softmax, renormalize or raw")


def _scatter_TxE(values_TxK: jax.Array, ids_TxK: jax.Array, num: int) -> jax.Array:
  """Dense [T, num] with values at ids (ids distinct per row), zero elsewhere."""
  one_hot_TxKxE = jax.nn.one_hot(ids_TxK, num, dtype=values_TxK.dtype)
  return jnp.sum(values_TxK[..., None] * one_hot_TxKxE, axis=1)  # a fusion, not T tiny GEMMs


TOP_K_IMPLS = ("sort", "rank")


def select_top_k(x_TxN: jax.Array, k: int, impl: str = "sort") -> tuple[jax.Array, jax.Array]:
  """`lax.top_k` over the last axis: (values, indices), values falling, ties to the lower
  index. impl="rank" finds them without a sort: each entry's rank in its row (how many
  entries beat it: larger, or equal at a lower index) from an [..., N, N] compare-and-count,
  then the entry of each rank 0..k-1 by a masked sum. The same values and indices as
  `lax.top_k` for rows without NaN (and without a -0.0 tied with a 0.0); the values'
  gradient is the same selection. For decoding's few rows (N = 8 groups or 64 experts):
  XLA fuses it with its neighbours, where a top_k is a sort kernel after a copy of its
  input (two of each a MoHGE layer's decode step on the H200, on the step's serial
  path; benchmarks/notes_generate.md, fourteenth session)."""
  if impl == "sort":
    return jax.lax.top_k(x_TxN, k)
  if impl != "rank":
    raise ValueError(f"select_top_k: impl={impl!r}: must be one of {TOP_K_IMPLS}")
  N = x_TxN.shape[-1]
  idx_N = jnp.arange(N, dtype=jnp.int32)
  x_i, x_j = x_TxN[..., :, None], x_TxN[..., None, :]
  beats_TxNxN = (x_j > x_i) | ((x_j == x_i) & (idx_N[None, :] < idx_N[:, None]))
  rank_TxN = jnp.sum(beats_TxNxN, axis=-1, dtype=jnp.int32)
  at_TxKxN = rank_TxN[..., None, :] == jnp.arange(k, dtype=jnp.int32)[:, None]
  ids_TxK = jnp.sum(jnp.where(at_TxKxN, idx_N, 0), axis=-1, dtype=jnp.int32)
  vals_TxK = jnp.sum(jnp.where(at_TxKxN, x_TxN[..., None, :], 0), axis=-1)
  return vals_TxK, ids_TxK


def two_level_route(group_logits: jax.Array, expert_logits: jax.Array, *, num_groups: int,
                    top_k_groups: int, top_k: int, combine_weights: str = "softmax",
                    forced: Forced | None = None, top_k_impl: str = "sort") -> Routing:
  """MoHGE routing: sigmoid group gate (top-Kg), per-group softmax expert gate, global top-K.

  group_logits: [T, G]; expert_logits: [T, G*N]. Ties go to the lower index. With
  `forced`, its groups and experts replace both top-k choices; the scores (and so the
  combine weights and their gradients) are still the live ones, gathered at those ids.
  top_k_impl: how both top-k's run (`select_top_k`: "sort", XLA's, or "rank", for
  decoding).
  """
  u_TxG = group_logits.astype(jnp.float32)
  v_TxE = expert_logits.astype(jnp.float32)
  T, G = u_TxG.shape
  if G != num_groups or v_TxE.shape[-1] % G:
    raise ValueError(f"group_logits {u_TxG.shape} and expert_logits {v_TxE.shape} do not "
                     f"match num_groups={num_groups}")
  N = v_TxE.shape[-1] // G
  if not (1 <= top_k_groups <= G and 1 <= top_k <= top_k_groups * N):
    raise ValueError(f"need 1 <= top_k_groups={top_k_groups} <= G={G} and "
                     f"1 <= top_k={top_k} <= top_k_groups*N={top_k_groups * N}")

  # 1. Group gate: sigmoid scores, top-Kg, renormalised over the selected groups.
  s_TxG = jax.nn.sigmoid(u_TxG)
  if forced is None:
    _, group_ids = select_top_k(s_TxG, top_k_groups, top_k_impl)
  else:
    group_ids = forced.group_ids.reshape(T, top_k_groups)
  selected_TxG = jnp.sum(jax.nn.one_hot(group_ids, G, dtype=jnp.float32), axis=1)
  masked_TxG = s_TxG * selected_TxG
  p_TxG = masked_TxG / jnp.sum(masked_TxG, axis=-1, keepdims=True)

  # 2-3. Expert gate: softmax within each group, scaled by the group probability.
  q_TxGxN = jax.nn.softmax(v_TxE.reshape(T, G, N), axis=-1)
  r_TxE = (p_TxG[:, :, None] * q_TxGxN).reshape(T, G * N)
  r_TxE = r_TxE / jnp.sum(r_TxE, axis=-1, keepdims=True)

  # 4-5. Global top-K over the masked scores, then the combine weights.
  if forced is None:
    r_sel_TxK, expert_ids = select_top_k(r_TxE, top_k, top_k_impl)
  else:
    expert_ids = forced.expert_ids.reshape(T, top_k)
    r_sel_TxK = jnp.take_along_axis(r_TxE, expert_ids, axis=-1)
  weights_TxK = combine(r_sel_TxK, combine_weights)
  return Routing(
      expert_ids=expert_ids.astype(jnp.int32),
      weights=weights_TxK,
      group_ids=group_ids.astype(jnp.int32),
      group_probs=p_TxG,
      group_softmax=jax.nn.softmax(u_TxG, axis=-1),
      expert_probs=_scatter_TxE(weights_TxK, expert_ids, G * N),
      router_probs=r_TxE,
  )


def topk_route(logits: jax.Array, *, top_k: int, combine_weights: str = "raw",
               forced: Forced | None = None, top_k_impl: str = "sort") -> Routing:
  """Homogeneous MoE baseline: softmax over all E experts, top-K (one group of E experts).
  With `forced`, its expert ids replace the top-K (live probabilities gathered at them).
  top_k_impl: as `two_level_route`'s."""
  logits_TxE = logits.astype(jnp.float32)
  T, E = logits_TxE.shape
  probs_TxE = jax.nn.softmax(logits_TxE, axis=-1)
  if forced is None:
    probs_sel_TxK, expert_ids = select_top_k(probs_TxE, top_k, top_k_impl)
  else:
    expert_ids = forced.expert_ids.reshape(T, top_k)
    probs_sel_TxK = jnp.take_along_axis(probs_TxE, expert_ids, axis=-1)
  weights_TxK = combine(probs_sel_TxK, combine_weights)
  ones_Tx1 = jnp.ones((T, 1), jnp.float32)
  return Routing(
      expert_ids=expert_ids.astype(jnp.int32),
      weights=weights_TxK,
      group_ids=jnp.zeros((T, 1), jnp.int32),
      group_probs=ones_Tx1,
      group_softmax=ones_Tx1,
      expert_probs=_scatter_TxE(weights_TxK, expert_ids, E),
      router_probs=probs_TxE,
  )
