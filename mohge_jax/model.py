"""The decoder LM: tokens -> embed -> blocks (attention, FFN) -> norm -> logits (float32).

    model = Transformer(cfg, rngs=nnx.Rngs(0))
    logits_BxLxV, aux = model(tokens_BxL)

Consecutive layers of one FFN kind form a `Stack` whose parameters carry a leading layer
axis (MoHGE-3B: one dense layer, then a stack of 14 MoHGE layers), run by `jax.lax.scan`
(`model.scan_layers`). Parameter paths are `stacks/<i>/layers/...`; `export` writes one
tensor per layer (`blocks.<layer>.…`) all the same.

`aux` holds every auxiliary loss term summed over layers (`group_aux`, `expert_aux`,
`z_loss`, and `dsa_kl`, the DSA indexer's KL: 0 without sparse attention) and routing
statistics per routed layer (`group_tokens` [layers, G], `expert_tokens` [layers, E]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mohge_jax import routing
from mohge_jax.attention import MHA, MLA, RMSNorm
from mohge_jax.config import Config
from mohge_jax.experts import RoutedFFN, SwiGLU
from mohge_jax.losses import logits_matmul

LOSS_TERMS = ("group_aux", "expert_aux", "z_loss", "dsa_kl")

_REMAT_POLICIES = {
    "full": None,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
    # DSA: the top-k selection (idx int32 + valid, T x K each a layer: 640 MB at 64k, K =
    # 2048) kept, so the backward pass does not run the indexer's top-k again
    "save_dsa_selection": jax.checkpoint_policies.save_only_these_names("dsa_selection"),
}


class Block(nnx.Module):
  def __init__(self, cfg: Config, ffn_kind: str, *, rngs: nnx.Rngs):
    m = cfg.model
    dtype = jnp.dtype(m.dtype)
    self.ffn_kind = ffn_kind
    self.attn_norm = RMSNorm(m.d_model, eps=m.norm_eps, dtype=dtype)
    if m.attention == "mla":
      self.attn = MLA(m, rngs=rngs, dsa_stage=cfg.train.dsa_stage)
    else:
      self.attn = MHA(m, rngs=rngs)
    self.ffn_norm = RMSNorm(m.d_model, eps=m.norm_eps, dtype=dtype)
    if ffn_kind == "dense":
      self.ffn = SwiGLU(m.d_model, m.dense_ffn_width, init_std=m.init_std,
                        down_std=m.output_init_std, dtype=dtype, rngs=rngs)
    else:
      self.ffn = RoutedFFN(cfg, ffn_kind, rngs=rngs)

  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, forced=None):
    a_BxLxD, attn_aux = self.attn(self.attn_norm(x_BxLxD), positions_BxL, segment_ids_BxL)
    x_BxLxD = x_BxLxD + checkpoint_name(a_BxLxD, "attention_out")
    h_BxLxD = self.ffn_norm(x_BxLxD)
    if self.ffn_kind == "dense":
      return x_BxLxD + self.ffn(h_BxLxD), attn_aux
    y_BxLxD, aux = self.ffn(h_BxLxD, forced)
    return x_BxLxD + y_BxLxD, {**aux, **attn_aux}


def layer_runs(ffn_kinds: tuple[str, ...]) -> list[tuple[str, int]]:
  """Consecutive layers of one FFN kind: ("dense", "mohge", "mohge") -> [("dense", 1),
  ("mohge", 2)]. Each run is one stack of parameters, scanned as one layer."""
  runs: list[tuple[str, int]] = []
  for kind in ffn_kinds:
    if runs and runs[-1][0] == kind:
      runs[-1] = (kind, runs[-1][1] + 1)
    else:
      runs.append((kind, 1))
  return runs


class Stack(nnx.Module):
  """`num` layers of one FFN kind, their parameters stacked on a leading [num] axis.

  The forward pass scans one layer's code over the stack (`scan=True`: tracing, lowering
  and compiling cost one layer whatever `num` is), or unrolls the same parameters in a
  Python loop (`scan=False`, for debugging); both give the same result. Remat, when on,
  wraps the scanned body: each layer's activations are recomputed in the backward pass.
  """

  def __init__(self, cfg: Config, ffn_kind: str, num: int, *, rngs: nnx.Rngs):
    keys_N = jax.random.split(rngs.params(), num)
    block = lambda key: Block(cfg, ffn_kind, rngs=nnx.Rngs(params=key))  # noqa: E731
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: block(keys_N[0])))
    self.layers = nnx.merge(graphdef, jax.vmap(lambda k: nnx.state(block(k)))(keys_N))
    self.num = num

  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, *, remat: str, scan: bool,
               forced=None):
    """`forced`: None or a routing.Forced with a leading [num] axis (routed stacks only)."""
    graphdef, state = nnx.split(self.layers)

    def body(x_BxLxD, layer_state_forced):
      layer_state, forced = layer_state_forced
      return nnx.merge(graphdef, layer_state)(x_BxLxD, positions_BxL, segment_ids_BxL, forced)

    if remat != "none":
      body = jax.checkpoint(body, policy=_REMAT_POLICIES[remat], prevent_cse=not scan)
    if scan:
      return jax.lax.scan(body, x_BxLxD, (state, forced))
    aux_per_layer = []
    for i in range(self.num):
      x_BxLxD, aux = body(x_BxLxD, jax.tree.map(lambda a: a[i], (state, forced)))
      aux_per_layer.append(aux)
    return x_BxLxD, jax.tree.map(lambda *a: jnp.stack(a), *aux_per_layer)


class Transformer(nnx.Module):
  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    m = cfg.model
    self.cfg = cfg
    self.dtype = jnp.dtype(m.dtype)
    V, D = m.padded_vocab, m.d_model
    self.embed = nnx.Param(m.init_std * jax.random.normal(rngs.params(), (V, D), jnp.float32))
    self.stacks = nnx.List([Stack(cfg, kind, n, rngs=rngs) for kind, n in layer_runs(m.ffn_kinds)])
    self.final_norm = RMSNorm(D, eps=m.norm_eps, dtype=self.dtype)
    self.head = nnx.Param(m.init_std * jax.random.normal(rngs.params(), (D, V), jnp.float32))

  def __call__(self, tokens_BxL: jax.Array, positions_BxL: jax.Array | None = None,
               segment_ids_BxL: jax.Array | None = None, *, return_hidden: bool = False,
               forced: routing.Forced | None = None):
    """Logits [B, L, V] float32 and the aux dict; with return_hidden, the final normed
    hidden states [B, L, D] instead of logits (for a chunked loss: see `head_weight`).

    `forced` replays a recorded routing in every routed layer (GRPO's keep routing):
    routing.Forced with ids [routed layers, B, L, K] and [routed layers, B, L, Kg], the
    routed layers in model order (what generate.generate returns)."""
    m = self.cfg.model
    B, L = tokens_BxL.shape
    if L > m.max_seq_len:
      raise ValueError(f"sequence length {L} exceeds model.max_seq_len={m.max_seq_len}")
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    if not m.doc_attention_mask:
      segment_ids_BxL = None

    x_BxLxD = jnp.take(self.embed[...], tokens_BxL, axis=0).astype(self.dtype)
    routed_aux = []
    first_routed = 0
    for stack in self.stacks:
      stack_forced = None
      if forced is not None and stack.layers.ffn_kind != "dense":
        stack_forced = jax.tree.map(lambda a: a[first_routed:first_routed + stack.num], forced)
        first_routed += stack.num
      x_BxLxD, aux = stack(x_BxLxD, positions_BxL, segment_ids_BxL, remat=m.remat,
                           scan=m.scan_layers, forced=stack_forced)
      if aux:
        routed_aux.append(aux)
    if forced is not None and forced.expert_ids.shape[0] != first_routed:
      raise ValueError(f"forced routing for {forced.expert_ids.shape[0]} layers, the model "
                       f"has {first_routed} routed layers")

    x_BxLxD = self.final_norm(x_BxLxD)
    if return_hidden:
      return x_BxLxD, _collect_aux(routed_aux)
    logits_BxLxV = logits_matmul(x_BxLxD, self.head[...].astype(self.dtype))
    return logits_BxLxV, _collect_aux(routed_aux)


def head_weight(model: Transformer) -> jax.Array:
  """The output layer [D, V] in the compute dtype (what __call__ multiplies by)."""
  return model.head[...].astype(model.dtype)


def _collect_aux(per_stack: list[dict[str, jax.Array]]) -> dict[str, jax.Array]:
  """Loss terms summed over every routed layer; statistics stacked [routed layers, ...]."""
  zero = jnp.zeros((), jnp.float32)
  out = {k: sum((a[k].sum() for a in per_stack if k in a), zero) for k in LOSS_TERMS}
  per_stack = [a for a in per_stack if "group_tokens" in a]
  if per_stack:
    out["group_tokens"] = jnp.concatenate([a["group_tokens"] for a in per_stack])
    out["expert_tokens"] = jnp.concatenate([a["expert_tokens"] for a in per_stack])
  return out
