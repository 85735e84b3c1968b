"""The decoder LM: tokens -> embed -> blocks (attention, FFN) -> norm -> logits (float32).

    model = Transformer(cfg, rngs=nnx.Rngs(0))
    logits_BxLxV, aux = model(tokens_BxL)

`aux` holds every auxiliary loss term summed over layers (`group_aux`, `expert_aux`,
`z_loss`) and routing statistics per routed layer (`group_tokens` [layers, G],
`expert_tokens` [layers, E]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mohge_jax.attention import MHA, MLA, RMSNorm
from mohge_jax.config import Config
from mohge_jax.experts import RoutedFFN, SwiGLU

LOSS_TERMS = ("group_aux", "expert_aux", "z_loss")

_REMAT_POLICIES = {
    "full": None,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
}


class Block(nnx.Module):
  def __init__(self, cfg: Config, ffn_kind: str, *, rngs: nnx.Rngs):
    m = cfg.model
    dtype = jnp.dtype(m.dtype)
    self.ffn_kind = ffn_kind
    self.attn_norm = RMSNorm(m.d_model, eps=m.norm_eps, dtype=dtype)
    self.attn = (MLA if m.attention == "mla" else MHA)(m, rngs=rngs)
    self.ffn_norm = RMSNorm(m.d_model, eps=m.norm_eps, dtype=dtype)
    if ffn_kind == "dense":
      self.ffn = SwiGLU(m.d_model, m.dense_ffn_width, init_std=m.init_std,
                        down_std=m.output_init_std, dtype=dtype, rngs=rngs)
    else:
      self.ffn = RoutedFFN(cfg, ffn_kind, rngs=rngs)

  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL):
    a_BxLxD = self.attn(self.attn_norm(x_BxLxD), positions_BxL, segment_ids_BxL)
    x_BxLxD = x_BxLxD + checkpoint_name(a_BxLxD, "attention_out")
    h_BxLxD = self.ffn_norm(x_BxLxD)
    if self.ffn_kind == "dense":
      return x_BxLxD + self.ffn(h_BxLxD), {}
    y_BxLxD, aux = self.ffn(h_BxLxD)
    return x_BxLxD + y_BxLxD, aux


class Transformer(nnx.Module):
  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    m = cfg.model
    self.cfg = cfg
    self.dtype = jnp.dtype(m.dtype)
    V, D = m.padded_vocab, m.d_model
    self.embed = nnx.Param(m.init_std * jax.random.normal(rngs.params(), (V, D), jnp.float32))
    self.blocks = nnx.List([Block(cfg, kind, rngs=rngs) for kind in m.ffn_kinds])
    self.final_norm = RMSNorm(D, eps=m.norm_eps, dtype=self.dtype)
    self.head = nnx.Param(m.init_std * jax.random.normal(rngs.params(), (D, V), jnp.float32))

  def __call__(self, tokens_BxL: jax.Array, positions_BxL: jax.Array | None = None,
               segment_ids_BxL: jax.Array | None = None, *, return_hidden: bool = False):
    """Logits [B, L, V] float32 and the aux dict; with return_hidden, the final normed
    hidden states [B, L, D] instead of logits (for a chunked loss: see `head_weight`)."""
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
    for block in self.blocks:
      if m.remat == "none":
        x_BxLxD, aux = block(x_BxLxD, positions_BxL, segment_ids_BxL)
      else:
        x_BxLxD, aux = nnx.remat(_call_block, policy=_REMAT_POLICIES[m.remat])(
            block, x_BxLxD, positions_BxL, segment_ids_BxL)
      if aux:
        routed_aux.append(aux)

    x_BxLxD = self.final_norm(x_BxLxD)
    if return_hidden:
      return x_BxLxD, _collect_aux(routed_aux)
    logits_BxLxV = jnp.dot(x_BxLxD, self.head[...].astype(self.dtype),
                           preferred_element_type=jnp.float32)
    return logits_BxLxV, _collect_aux(routed_aux)


def head_weight(model: Transformer) -> jax.Array:
  """The output layer [D, V] in the compute dtype (what __call__ multiplies by)."""
  return model.head[...].astype(model.dtype)


def _call_block(block, x_BxLxD, positions_BxL, segment_ids_BxL):
  return block(x_BxLxD, positions_BxL, segment_ids_BxL)


def _collect_aux(per_layer: list[dict[str, jax.Array]]) -> dict[str, jax.Array]:
  zero = jnp.zeros((), jnp.float32)
  out = {k: sum((a[k] for a in per_layer), zero) for k in LOSS_TERMS}
  if per_layer:
    out["group_tokens"] = jnp.stack([a["group_tokens"] for a in per_layer])
    out["expert_tokens"] = jnp.stack([a["expert_tokens"] for a in per_layer])
  return out
