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
  # [T, E] bool: expert e among token t's K (the one-hot of expert_ids, summed), where the
  # selection has it at hand (top_k_impl="rank": its ranks < K; decoding's slot assignment
  # starts from it); else None.
  chosen: jax.Array | None = None


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
  follow those roundings.

  bf16 activations (the models' compute dtype): one bf16 product against the weights'
  three bf16 parts (`bf16_parts`: w = w_hi + w_mid + w_lo exactly), float32 accumulation.
  Each product of a bf16 activation and a bf16 part is exact in float32, so the logits are
  float32 products, on the tensor cores. On the H200 the HIGHEST product (float32 FMAs)
  took ~11 us a MoHGE-3B layer at decode, on the step's serial path (benchmarks/
  notes_generate.md, fifteenth session). The gradient (`_bf16_logits_bwd`) at HIGHEST.
  bf16 weights (a bf16 export): the one product against them (their mid and lo parts
  would be zeros).
  Other activations: HIGHEST (true float32 on a GPU, six bf16 passes on a TPU)."""
  if x_TxD.dtype == jnp.bfloat16:
    return _bf16_logits(x_TxD, w_DxL if w_DxL.dtype == jnp.bfloat16
                        else w_DxL.astype(jnp.float32))
  w_DxL = w_DxL.astype(jnp.float32)
  return _f32_product(x_TxD.astype(jnp.float32), w_DxL)


def router_operand(w_DxL: jax.Array) -> jax.Array:
  """The router's weights as the bf16 operand of `logits_from_operand`, made once where
  the same weights route many steps (decoding: `dispatch.stack_experts(router=)`): bf16
  weights as they are [D, L], float32 ones as their three bf16 parts side by side
  [D, 3L] (`bf16_parts`). Per step, `router_logits` makes it again: 14 launches a
  MoHGE-3B decode step on the H200, off its critical path (the step no faster without
  them; benchmarks/notes_generate.md, twenty-sixth session)."""
  if w_DxL.dtype == jnp.bfloat16:
    return w_DxL
  return jnp.concatenate(bf16_parts(w_DxL), axis=1)


def logits_from_operand(x_TxD: jax.Array, w_DxPL: jax.Array, num_logits: int) -> jax.Array:
  """`router_logits` (bf16 activations, no gradient) from `router_operand`'s [D, P * L]
  (P = 1 or 3): float32 [T, L], the same sums as router_logits'."""
  L = num_logits
  if x_TxD.dtype != jnp.bfloat16 or w_DxPL.dtype != jnp.bfloat16 or w_DxPL.shape[1] not in (
      L, 3 * L):
    raise ValueError(f"logits_from_operand: x {x_TxD.dtype}, operand {w_DxPL.dtype}"
                     f"{list(w_DxPL.shape)} for {L} logits: want bf16 and [D, {L}] or "
                     f"[D, {3 * L}]")
  y_TxPL = jnp.dot(x_TxD, w_DxPL, preferred_element_type=jnp.float32)
  if w_DxPL.shape[1] == L:
    return y_TxPL
  return y_TxPL[:, :L] + (y_TxPL[:, L:2 * L] + y_TxPL[:, 2 * L:])


def _f32_product(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def bf16_parts(w: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """float32 w -> bf16 (hi, mid, lo) with hi + mid + lo == w exactly: each part the top 8
  significant bits of what is left (cut by masking the low 16 bits, so each part and each
  remainder is exact; converts would let XLA's excess-precision rewrite fold
  f32 -> bf16 -> f32 away and lose the low parts). Exact for normal float32 values above
  ~2^-100 (smaller ones leave parts below float32's normal range)."""
  def top(v):
    bits = jax.lax.bitcast_convert_type(v, jnp.uint32) & jnp.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)
  w = w.astype(jnp.float32)
  hi = top(w)
  mid = top(w - hi)
  lo = w - hi - mid
  return hi.astype(jnp.bfloat16), mid.astype(jnp.bfloat16), lo.astype(jnp.bfloat16)


@jax.custom_vjp
def _bf16_logits(x_TxD: jax.Array, w_DxL: jax.Array) -> jax.Array:
  return logits_from_operand(x_TxD, router_operand(w_DxL), w_DxL.shape[1])


def _bf16_logits_fwd(x_TxD, w_DxL):
  return _bf16_logits(x_TxD, w_DxL), (x_TxD, w_DxL)


def _bf16_logits_bwd(res, g_TxL):
  x_TxD, w_DxL = res   # w float32, or bf16 (then its gradient is rounded to bf16)
  return (_f32_product(g_TxL, w_DxL.T.astype(jnp.float32)).astype(x_TxD.dtype),
          _f32_product(x_TxD.astype(jnp.float32).T, g_TxL).astype(w_DxL.dtype))


_bf16_logits.defvjp(_bf16_logits_fwd, _bf16_logits_bwd)


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
  vals_TxK, ids_TxK, _ = _select(x_TxN, k, impl)
  return vals_TxK, ids_TxK


def top_k_by_rank(x_TxN: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`select_top_k(impl="rank")`'s values and indices, and each entry's rank [..., N]
  int32 (0 for the largest; entries with rank < k are the chosen ones)."""
  N = x_TxN.shape[-1]
  idx_N = jnp.arange(N, dtype=jnp.int32)
  x_i, x_j = x_TxN[..., :, None], x_TxN[..., None, :]
  beats_TxNxN = (x_j > x_i) | ((x_j == x_i) & (idx_N[None, :] < idx_N[:, None]))
  rank_TxN = jnp.sum(beats_TxNxN, axis=-1, dtype=jnp.int32)
  at_TxKxN = rank_TxN[..., None, :] == jnp.arange(k, dtype=jnp.int32)[:, None]
  ids_TxK = jnp.sum(jnp.where(at_TxKxN, idx_N, 0), axis=-1, dtype=jnp.int32)
  vals_TxK = jnp.sum(jnp.where(at_TxKxN, x_TxN[..., None, :], 0), axis=-1)
  return vals_TxK, ids_TxK, rank_TxN


def _select(x_TxN: jax.Array, k: int, impl: str):
  """select_top_k's (values, indices) and the chosen mask [T, N] (impl "rank"; else None)."""
  if impl == "sort":
    return (*jax.lax.top_k(x_TxN, k), None)
  if impl != "rank":
    raise ValueError(f"select_top_k: impl={impl!r}: must be one of {TOP_K_IMPLS}")
  vals_TxK, ids_TxK, rank_TxN = top_k_by_rank(x_TxN, k)
  return vals_TxK, ids_TxK, rank_TxN < k


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

  # 2-3. Expert gate: softmax within each group, scaled by the group probability, then
  # renormalised over all E (spec: a no-op in exact arithmetic, p sums to 1).
  q_TxGxN = jax.nn.softmax(v_TxE.reshape(T, G, N), axis=-1)
  pq_TxE = (p_TxG[:, :, None] * q_TxGxN).reshape(T, G * N)
  sum_Tx1 = jnp.sum(pq_TxE, axis=-1, keepdims=True)
  r_TxE = pq_TxE / sum_Tx1

  # 4-5. Global top-K over the masked scores, then the combine weights. The top-K of r is
  # the top-K of p*q (one positive divisor a row), so the selection reads p*q and the
  # selected values are divided after (the same numbers as gathering r): the sum and the
  # division are then off decoding's serial path (two launches a layer on the H200).
  chosen_TxE = None
  if forced is None:
    pq_sel_TxK, expert_ids, chosen_TxE = _select(pq_TxE, top_k, top_k_impl)
    r_sel_TxK = pq_sel_TxK / sum_Tx1
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
      chosen=chosen_TxE,
  )


def topk_route(logits: jax.Array, *, top_k: int, combine_weights: str = "raw",
               forced: Forced | None = None, top_k_impl: str = "sort") -> Routing:
  """Homogeneous MoE baseline: softmax over all E experts, top-K (one group of E experts).
  With `forced`, its expert ids replace the top-K (live probabilities gathered at them).
  top_k_impl: as `two_level_route`'s."""
  logits_TxE = logits.astype(jnp.float32)
  T, E = logits_TxE.shape
  probs_TxE = jax.nn.softmax(logits_TxE, axis=-1)
  chosen_TxE = None
  if forced is None:
    probs_sel_TxK, expert_ids, chosen_TxE = _select(probs_TxE, top_k, top_k_impl)
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
      chosen=chosen_TxE,
  )
