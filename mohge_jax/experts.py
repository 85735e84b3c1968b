"""Feed-forward layers: dense SwiGLU and the routed (MoHGE / homogeneous MoE) layer.

The routed layer reads route -> dispatch (sort token-expert pairs by expert) -> grouped
experts of every width (`dispatch.grouped_ffn`, the one backend-choosing function) ->
combine, on one device (`dispatch.dispatch_and_combine`) or with the experts split over the
mesh's expert axis (`expert_parallel.routed_experts`). Dropless: no capacity, every
token-expert pair is computed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mohge_jax import expert_parallel, losses, routing
from mohge_jax.config import Config
from mohge_jax.dispatch import (StackedExperts, all_experts, capacity_experts,
                                dispatch_and_combine, slot_capacity, swiglu)

_DECODING_BACKENDS = ("all_experts", "capacity")   # `RoutedFFN.__call__`'s, for decoding

# ----------------------------------------------------------------------------- modules


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float) -> nnx.Param:
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32))


class SwiGLU(nnx.Module):
  """Dense SwiGLU FFN with fused gate/up: [D, 2F] and [F, D]. `down_std` (default
  init_std) initialises w_down, the output projection (ModelConfig.output_init_std)."""

  def __init__(self, d_model: int, width: int, *, init_std: float, dtype, rngs: nnx.Rngs,
               down_std: float | None = None):
    self.w_gate_up = _normal(rngs, (d_model, 2 * width), init_std)
    self.w_down = _normal(rngs, (width, d_model), init_std if down_std is None else down_std)
    self.dtype = dtype

  def __call__(self, x_TxD: jax.Array) -> jax.Array:
    # Matmuls in the compute dtype (float32 accumulation inside; see attention.MLA._mm),
    # the activation in float32.
    h_TxF2 = jnp.dot(x_TxD, self.w_gate_up[...].astype(self.dtype))
    a_TxF = swiglu(h_TxF2.astype(jnp.float32)).astype(self.dtype)
    return jnp.dot(a_TxF, self.w_down[...].astype(self.dtype))


class RoutedFFN(nnx.Module):
  """MoHGE layer (kind 'mohge': two-level router) or homogeneous MoE (kind 'moe': top-K)."""

  def __init__(self, cfg: Config, kind: str, *, rngs: nnx.Rngs):
    m = cfg.model
    self.kind, self.cfg = kind, cfg
    self.dtype = jnp.dtype(m.dtype)
    G, N, D = m.num_groups, m.experts_per_group, m.d_model
    if kind == "mohge":
      self.group_router = _normal(rngs, (D, G), m.init_std)
    self.expert_router = _normal(rngs, (D, G * N), m.init_std)
    self.w_gate_up = nnx.List([_normal(rngs, (N, D, 2 * w), m.init_std) for w in m.group_widths])
    self.w_down = nnx.List([_normal(rngs, (N, w, D), m.output_init_std)
                            for w in m.group_widths])
    self.shared = (SwiGLU(D, m.num_shared_experts * m.shared_expert_width,
                          init_std=m.init_std, down_std=m.output_init_std, dtype=self.dtype,
                          rngs=rngs)
                   if m.num_shared_experts else None)

  def router_weights(self) -> jax.Array:
    """The router's weights [D, G + E] (MoHGE: group columns first) or [D, E] (MoE), as
    the decode step's fused routing takes them (`pallas_kernels.route_gpu`)."""
    if self.kind == "mohge":
      return jnp.concatenate([self.group_router[...], self.expert_router[...]], axis=1)
    return self.expert_router[...]

  def route(self, x_TxD: jax.Array, forced: routing.Forced | None = None,
            top_k_impl: str = "sort") -> tuple[routing.Routing, dict[str, jax.Array]]:
    """top_k_impl: `routing.select_top_k`'s ("rank" when decoding)."""
    m, lo = self.cfg.model, self.cfg.loss
    # The aux losses' statistics per chunk of loss.aux_tokens tokens. Config validation makes
    # every training micro-batch a multiple; other inputs (inference, where the aux losses
    # are unused) that are not use the whole batch.
    T = x_TxD.shape[0]
    chunk = lo.aux_tokens if lo.aux_tokens and T % lo.aux_tokens == 0 else 0
    v_TxE = routing.router_logits(x_TxD, self.expert_router[...])
    if self.kind == "mohge":
      u_TxG = routing.router_logits(x_TxD, self.group_router[...])
      r = routing.two_level_route(u_TxG, v_TxE, num_groups=m.num_groups,
                                  top_k_groups=m.top_k_groups, top_k=m.top_k,
                                  combine_weights=m.combine_weights, forced=forced,
                                  top_k_impl=top_k_impl)
      aux = {
          "group_aux": losses.group_wise_aux_loss(
              r.group_softmax, r.group_ids, widths=m.group_widths,
              delta=lo.group_aux_delta, coef=lo.group_aux_coef, chunk=chunk),
          "expert_aux": losses.intra_group_aux_loss(
              r.expert_probs, r.expert_ids, experts_per_group=m.experts_per_group,
              top_k_groups=m.top_k_groups, coef=lo.expert_aux_coef, chunk=chunk),
      }
      z_logits = (u_TxG, v_TxE)
    else:
      r = routing.topk_route(v_TxE, top_k=m.top_k, combine_weights=m.combine_weights,
                             forced=forced, top_k_impl=top_k_impl)
      aux = {
          "group_aux": jnp.zeros((), jnp.float32),
          "expert_aux": losses.switch_aux_loss(r.router_probs, r.expert_ids,
                                               coef=lo.expert_aux_coef, chunk=chunk),
      }
      z_logits = (v_TxE,)
    aux["z_loss"] = sum((losses.z_loss(z, coef=lo.z_loss_coef) for z in z_logits),
                        jnp.zeros((), jnp.float32))
    expert_tokens_E = losses.counts(r.expert_ids, m.num_experts)
    aux["expert_tokens"] = expert_tokens_E
    aux["group_tokens"] = expert_tokens_E.reshape(m.num_groups, -1).sum(-1)
    return r, aux

  def __call__(self, x_BxLxD: jax.Array, forced: routing.Forced | None = None, *,
               backend: str | None = None, stacked: StackedExperts | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """y [B, L, D] and aux: the loss terms, the token counts, and the routing itself
    (`expert_ids` [B, L, K], `group_ids` [B, L, Kg]: what generation records). `forced`
    ([B, L, ...] ids) replays a recorded routing (GRPO's keep routing). `backend`: the
    experts' backend for this call (None: model.expert_backend), or "all_experts" /
    "capacity" (`all_experts`, `capacity_experts`: for decoding; not under expert
    parallelism); with "capacity", `stacked` (this layer's `dispatch.stack_experts`) runs
    the slot block through the Mosaic GPU kernels (and with stacked.route="kernel" the
    routing too, `_decode_with_route_kernel`: aux then holds the routing alone)."""
    B, L, D = x_BxLxD.shape
    x_TxD = x_BxLxD.reshape(B * L, D)
    if backend == "capacity" and stacked is not None and forced is None:
      fused = self._decode_with_route_kernel(x_TxD, stacked)
      if fused is not None:   # routing only, no loss terms (decoding)
        y_TxD, rs = fused
        return y_TxD.astype(self.dtype).reshape(B, L, D), {
            "expert_ids": rs.expert_ids.reshape(B, L, -1),
            "group_ids": rs.group_ids.reshape(B, L, -1)}
    with jax.named_scope("router"):  # (named scopes: profiles group kernels by them)
      # decoding's backends: a few rows, top-k's without a sort (`routing.select_top_k`)
      r, aux = self.route(x_TxD, forced, top_k_impl="rank" if backend in _DECODING_BACKENDS
                          else "sort")
    aux["expert_ids"] = r.expert_ids.reshape(B, L, -1)
    aux["group_ids"] = r.group_ids.reshape(B, L, -1)
    E = self.cfg.model.num_experts

    w_gate_up = [w[...].astype(self.dtype) for w in self.w_gate_up]
    w_down = [w[...].astype(self.dtype) for w in self.w_down]
    backend = backend or self.cfg.model.expert_backend
    mesh = jax.sharding.get_abstract_mesh()
    with jax.named_scope("routed_experts"):
      if backend == "all_experts":
        y_TxD = all_experts(x_TxD, r.expert_ids, r.weights, w_gate_up, w_down)
      elif backend == "capacity":
        y_TxD = capacity_experts(x_TxD, r.expert_ids, r.weights, w_gate_up, w_down,
                                 stacked=stacked, chosen_TxE=r.chosen)
      elif not mesh.empty and mesh.shape.get("expert", 1) > 1:
        y_TxD = expert_parallel.routed_experts(
            x_TxD, r.expert_ids, r.weights, w_gate_up, w_down, mesh=mesh,
            experts_per_group=self.cfg.model.experts_per_group,
            comm=self.cfg.mesh.expert_comm, backend=backend, placement=self.cfg.mesh.placement)
      else:
        y_TxD = dispatch_and_combine(x_TxD, r.expert_ids, r.weights, w_gate_up, w_down, E,
                                     backend=backend)
    y_TxD = self._add_shared(x_TxD, y_TxD)
    return y_TxD.astype(self.dtype).reshape(B, L, D), aux

  def _add_shared(self, x_TxD, y_TxD):
    if self.shared is None:
      return y_TxD
    with jax.named_scope("shared_experts"):
      return y_TxD + self.shared(x_TxD).astype(jnp.float32)

  def _decode_with_route_kernel(self, x_TxD, stacked: StackedExperts):
    """Decoding through the slot kernels with the routing and slot assignment in one
    kernel (`pallas_kernels.route_gpu`): (y [T, D] float32, its RouteSlots), or None where
    `stacked.route` is 'xla' or the kernel does not take these shapes (route 'kernel':
    impl "wgmma", 'kernel_rows': impl "rows", 'kernel_triton': impl "triton"). The same
    function as `route` + `capacity_experts` (tested against them); no loss terms."""
    from pallas_kernels import route_gpu   # noqa: PLC0415 - a GPU kernel, decode only
    m = self.cfg.model
    T = x_TxD.shape[0]
    G = m.num_groups if self.kind == "mohge" else 0
    impl = {"kernel": "wgmma", "kernel_rows": "rows", "kernel_triton": "triton"}.get(
        stacked.route)
    if impl is None or route_gpu.unsupported_reason(
        T, G, m.num_experts, m.top_k_groups, m.top_k, impl):
      return None
    with jax.named_scope("router"):
      if stacked.router is not None and x_TxD.dtype == jnp.bfloat16:
        logits_TxL = routing.logits_from_operand(x_TxD, stacked.router, G + m.num_experts)
      else:
        logits_TxL = routing.router_logits(x_TxD, self.router_weights())
      D = x_TxD.shape[1]   # impl "triton" also copies the tokens' rows to their slots
      with_x = impl == "triton" and D & (D - 1) == 0
      r = route_gpu.route_slots(   # dropless: C >= T, no overflow (capacity_experts)
          logits_TxL, num_groups=G, top_k_groups=m.top_k_groups, top_k=m.top_k,
          combine_weights=m.combine_weights,
          capacity=slot_capacity(T, m.top_k, m.num_experts, stacked,
                                 dropless=with_x and stacked.dropless),
          interpret=stacked.config().interpret, impl=impl, x=x_TxD if with_x else None)
    w_gate_up = [w[...].astype(self.dtype) for w in self.w_gate_up]
    w_down = [w[...].astype(self.dtype) for w in self.w_down]
    with jax.named_scope("routed_experts"):
      y_TxD = capacity_experts(x_TxD, r.expert_ids, r.weights, w_gate_up, w_down,
                               stacked=stacked, slots=r)
    return self._add_shared(x_TxD, y_TxD), r
