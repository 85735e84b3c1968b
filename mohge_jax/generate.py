"""Generation: KV-cached prefill and decode, sampling, and the command line.

    python -m mohge_jax.generate WORKDIR_OR_EXPORT --prompt "def f(" [--prompt ...]
        [--batch-file FILE] [--max-new-tokens 64] [--temperature 1.0] [--top-k 0]
        [--top-p 1.0] [--seed 0]
        [--decode-backend auto|model|all_experts|capacity|capacity_kernel]
        [--scan-layers]

    out = generate(model, prompts_BxP, lengths_B, jax.random.key(0), max_new_tokens=32,
                   temperature=0.8, top_p=0.95, stop_ids=(eos,), record_routes=True)

Layout: prompts are right-padded ([B, P] with per-row lengths), so row b's token i sits at
position i and cache slot i; generated token t of row b is fed at position lengths[b] + t.
Prefill runs the training form of attention over the whole padded prompt (causality keeps
each row's padding out of its real tokens) and stores MLA's latent and rope key per
position (`attention.MLACache`); each decode step feeds one token per row, writes its slot
and attends in the absorbed form over the slots up to its position, so the padding slots a
row will overwrite are never seen. Prefill runs the layers as one `jax.lax.scan` per stack
of the model; the decode steps run them unrolled over per-layer copies of the weights and
per-layer caches (written in place), or with --scan-layers / unrolled=False as the scan,
each layer reading and writing its slice of the stacked cache (slower: the slices copy).

Letters: B rows, P prompt length, N new tokens, S = P + N cache slots, V padded vocabulary,
R routed layers, K experts and Kg groups per token.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mohge_jax import dispatch, routing
from mohge_jax.attention import DECODE_WEIGHT_NAMES, MLA, MLACache, MLADecodeWeights
from mohge_jax.losses import logits_matmul
from mohge_jax.model import Transformer, head_weight
from pallas_kernels import mla_decode_gpu


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["tokens", "logprobs", "sampling_mask", "lengths", "routes"],
                   meta_fields=[])
@dataclasses.dataclass
class Generated:
  """What `generate` returns (a pytree).

  tokens: [B, N] int32 sampled tokens; after a row's stop token, `pad_id`.
  logprobs: [B, N] float32 log-probability of each token under the sampler's distribution
    (temperature, top-k, top-p applied); 0 after the stop token and when greedy.
  sampling_mask: [B, N, V] bool, the vocabulary entries the sampler allowed at each step
    (GRPO's keep sampling mask); all False after the stop token. None with
    return_mask=False (B*N*V booleans: 8 GB at B=64, N=1024 and a 130k vocabulary).
  lengths: [B] int32 tokens generated per row, the stop token included.
  routes: None, or the routing of every position of each row's sequence
    (prompt[:length] then the generated tokens: `sequences`), as routing.Forced with
    expert_ids [R, B, S, K] and group_ids [R, B, S, Kg] (GRPO's keep routing; what
    `Transformer(..., forced=...)` takes).
  """
  tokens: jax.Array
  logprobs: jax.Array
  sampling_mask: jax.Array | None
  lengths: jax.Array
  routes: routing.Forced | None = None


# ----------------------------------------------------------------------------- sampling


def sampling_mask(logits_BxV: jax.Array, *, vocab_size: int, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """(allowed_BxV bool, scaled_BxV float32): which entries the sampler may draw and the
  logits it draws from (divided by the temperature, -inf where not allowed).

  Entries >= vocab_size (the padded vocabulary) are never allowed. temperature 0: only the
  argmax (ties: the lowest id). Otherwise top_k > 0 keeps the k largest (ties: lower id
  first), then top_p < 1 keeps the smallest prefix of those, largest first, whose
  probability (renormalised over the top-k) reaches top_p: an entry is kept when the mass
  before it is < top_p.
  """
  B, V = logits_BxV.shape
  valid_V = jnp.arange(V) < vocab_size
  x_BxV = jnp.where(valid_V, logits_BxV.astype(jnp.float32), -jnp.inf)
  if temperature == 0:
    allowed_BxV = jax.nn.one_hot(jnp.argmax(x_BxV, axis=-1), V, dtype=jnp.bool_)
    return allowed_BxV, jnp.where(allowed_BxV, x_BxV, -jnp.inf)
  x_BxV = x_BxV / temperature
  if top_k == 0 and top_p >= 1.0:   # every valid entry: no sort of the vocabulary a step
    allowed_BxV = jnp.isfinite(x_BxV)
    return allowed_BxV, jnp.where(allowed_BxV, x_BxV, -jnp.inf)
  order_BxV = jnp.argsort(-x_BxV, axis=-1, stable=True)
  sorted_BxV = jnp.take_along_axis(x_BxV, order_BxV, axis=-1)
  keep_BxV = jnp.isfinite(sorted_BxV)
  if top_k > 0:
    keep_BxV &= jnp.arange(V) < top_k
  if top_p < 1.0:
    probs_BxV = jax.nn.softmax(jnp.where(keep_BxV, sorted_BxV, -jnp.inf), axis=-1)
    keep_BxV &= (jnp.cumsum(probs_BxV, axis=-1) - probs_BxV) < top_p
  rows_Bx1 = jnp.arange(B)[:, None]
  allowed_BxV = jnp.zeros((B, V), jnp.bool_).at[rows_Bx1, order_BxV].set(keep_BxV)
  return allowed_BxV, jnp.where(allowed_BxV, x_BxV, -jnp.inf)


def sample(key: jax.Array, logits_BxV: jax.Array, *, vocab_size: int, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(tokens_B int32, logprobs_B float32, allowed_BxV bool): one draw per row."""
  allowed_BxV, scaled_BxV = sampling_mask(logits_BxV, vocab_size=vocab_size,
                                          temperature=temperature, top_k=top_k, top_p=top_p)
  if temperature == 0:
    tokens_B = jnp.argmax(allowed_BxV, axis=-1).astype(jnp.int32)
    return tokens_B, jnp.zeros(tokens_B.shape, jnp.float32), allowed_BxV
  tokens_B = jax.random.categorical(key, scaled_BxV, axis=-1).astype(jnp.int32)
  logp_BxV = jax.nn.log_softmax(scaled_BxV, axis=-1)
  return tokens_B, jnp.take_along_axis(logp_BxV, tokens_B[:, None], axis=-1)[:, 0], allowed_BxV


# ----------------------------------------------------------------------------- the model


def _check_model(model: Transformer) -> None:
  if not all(isinstance(s.layers.attn, MLA) for s in model.stacks):
    raise NotImplementedError("generation supports model.attention=mla only")


def _embed(model: Transformer, tokens: jax.Array) -> jax.Array:
  return jnp.take(model.embed[...], tokens, axis=0).astype(model.dtype)


def _logits(model: Transformer, x: jax.Array) -> jax.Array:
  with jax.named_scope("lm_head"):
    return logits_matmul(model.final_norm(x), head_weight(model))


# Greedy decoding's output layer (`greedy_tokens`): "auto" takes the fused kernel
# (`pallas_kernels.head_gpu.greedy_head`: the logits' GEMM with each row's maximum and its
# index in the epilogue, the float32 logits never written) where it runs and pays (a Hopper
# GPU, no mesh of several devices, bf16/f16, the shapes its tiles take, from
# `head_gpu.AUTO_MIN_BATCH` rows), else XLA's logits and argmax; "kernel" and "xla" force
# one. On the H200, MoHGE-3B at batch 256: the output layer 0.123 ms against 0.167, the
# decode step 3.199-3.209 ms against 3.247-3.251 (twenty-seventh session).
GREEDY_HEADS = ("auto", "kernel", "xla")


def greedy_tokens(model: Transformer, x_Bx1xD: jax.Array, head: str = "auto") -> jax.Array:
  """The argmax over the valid vocabulary of the logits of x [B, 1, D] (ties: the lowest
  id, as `sampling_mask` at temperature 0): int32 [B]. head: GREEDY_HEADS."""
  if head not in GREEDY_HEADS:
    raise ValueError(f"greedy head {head!r}: must be one of {GREEDY_HEADS}")
  vocab = model.cfg.model.vocab_size
  with jax.named_scope("lm_head"):
    x_BxD = model.final_norm(x_Bx1xD)[:, 0]
    w_DxV = head_weight(model)
    if head == "kernel" or (head == "auto" and _head_kernel_takes(x_BxD, w_DxV)):
      from pallas_kernels import head_gpu  # noqa: PLC0415 - only on the decode path
      return head_gpu.greedy_head(x_BxD, w_DxV, vocab)[0]
    logits_BxV = logits_matmul(x_BxD, w_DxV)
    valid_V = jnp.arange(logits_BxV.shape[-1]) < vocab
    return jnp.argmax(jnp.where(valid_V, logits_BxV, -jnp.inf), axis=-1).astype(jnp.int32)


def _one_hopper_gpu() -> bool:
  """A Hopper GPU (Mosaic GPU kernels) and no mesh of several devices: where decode's own
  kernels run."""
  import pallas_kernels  # noqa: PLC0415 - only asked for on the decode path
  mesh = jax.sharding.get_abstract_mesh()
  return (pallas_kernels.resolve_backend("auto") == "mosaic_gpu"
          and (mesh.empty or mesh.size == 1))


def _head_kernel_takes(x_BxD: jax.Array, w_DxV: jax.Array) -> bool:
  if not _one_hopper_gpu():
    return False
  from pallas_kernels import head_gpu  # noqa: PLC0415
  return (w_DxV.dtype == x_BxD.dtype and x_BxD.shape[0] >= head_gpu.AUTO_MIN_BATCH
          and head_gpu.unsupported_reason(*x_BxD.shape, w_DxV.shape[1], x_BxD.dtype) is None)


def _output(model: Transformer, x_Bx1xD: jax.Array, greedy: str | None) -> jax.Array:
  """A decode step's output: the logits [B, V] float32 (greedy None) or the greedy tokens
  [B] int32 (`greedy_tokens`, greedy its head)."""
  if greedy is None:
    return _logits(model, x_Bx1xD)[:, 0]
  return greedy_tokens(model, x_Bx1xD, greedy)


def decode_expert_backend(m, tokens: int) -> str:
  """decode_backend="auto" for `tokens` tokens a step: `dispatch.capacity_experts` from 8
  routed rows per expert on average (tokens * top_k >= 8 * experts), through the Mosaic
  GPU kernels ("capacity_kernel") for experts of several widths on a Hopper GPU that takes
  them, else in XLA; `dispatch.all_experts` below, but for fewer token-expert pairs than
  experts, where the kernels run the chosen experts only (`StackedExperts.sparse`). On the
  H200 (unrolled layers; benchmarks/results/decode_h200.json): MoHGE-3B at batch 256 (24
  rows per expert) capacity_kernel 4.48 ms a step against capacity 5.25 (ninth session;
  with the decode kernel `slot_gpu` 4.28-4.49, tenth), all_experts 7.3 and the training
  kernels 11.1 (fifth); batch 128: 4.02 against 4.68 (3.82 tenth); batch 32 (3 rows)
  all_experts 3.56 against capacity 3.86 (2.394 against the kernels' 2.400,
  twenty-fifth); batch 8 the kernels' chosen experts 1.782 against all_experts 2.052,
  batch 1 1.274 against 3.347 (twenty-fifth). One group of equal experts (MoE-3B) is one
  batched product a projection, which XLA runs near the kernels' speed: there batch 256
  took 4.69 ms with the kernels against 4.45 without (calls apart), so XLA's stays; but
  the chosen experts only win there too (batch 1 1.274 ms against all_experts' 2.628,
  batch 8 1.896 against 2.215; twenty-fifth)."""
  if (tokens * m.top_k < m.num_experts and dispatch.DECODE_KERNEL_TUNING.get("sparse")
      and _expert_kernels_take(m)):
    return "capacity_kernel"
  if tokens * m.top_k < 8 * m.num_experts:
    return "all_experts"
  return "capacity_kernel" if expert_kernels_for_decode(m) else "capacity"


def expert_kernels_for_decode(m) -> bool:
  """Whether decode_backend="auto" runs the decode experts through the Mosaic GPU
  kernels: groups of several widths (`decode_expert_backend`), a Hopper GPU, no mesh of
  several devices, bf16/f16, and widths and d_model the kernels' tiles take."""
  return m.num_groups >= 2 and _expert_kernels_take(m)


def _expert_kernels_take(m) -> bool:
  """A Hopper GPU, no mesh of several devices, bf16/f16, and widths and d_model the
  kernels' tiles take."""
  if not _one_hopper_gpu():
    return False
  from pallas_kernels import gpu  # noqa: PLC0415
  return (jnp.dtype(m.dtype) in (jnp.bfloat16, jnp.float16)
          and gpu.unsupported_reason(m.group_widths, m.d_model,
                                     dispatch.kernel_config()) is None)


def _ffn(block, h_BxLxD, expert_backend: str | None = None, stacked=None):
  """The block's FFN on [B, L, D]: (y, routed ids or None). `stacked`: the layer's
  `dispatch.StackedExperts` (decode_backend="capacity_kernel")."""
  if block.ffn_kind == "dense":
    with jax.named_scope("dense_ffn"):
      return block.ffn(h_BxLxD), None
  if expert_backend == "auto":
    expert_backend = decode_expert_backend(block.ffn.cfg.model,
                                           h_BxLxD.shape[0] * h_BxLxD.shape[1])
    if expert_backend == "capacity_kernel" and stacked is None:  # (the layer scan)
      expert_backend = "capacity"
  if expert_backend == "capacity_kernel":
    if stacked is None:
      raise ValueError("decode_backend='capacity_kernel' needs the layers' stacked experts: "
                       "unstack_layers(model, stack_experts=True)")
    expert_backend = "capacity"
  y_BxLxD, aux = block.ffn(h_BxLxD, backend=expert_backend, stacked=stacked)
  return y_BxLxD, routing.Forced(aux["expert_ids"], aux["group_ids"])


def cache_length(S: int) -> int:
  """Cache slots for S positions, rounded up to the decode kernel's step of 64 slots
  (`mla_decode_gpu.SLOTS`; slots past a row's position are masked and never read by it)."""
  return -(-S // mla_decode_gpu.SLOTS) * mla_decode_gpu.SLOTS


def prefill(model: Transformer, tokens_BxP: jax.Array, lengths_B: jax.Array, cache_len: int):
  """The prompt through every layer (training-form attention, positions 0..P-1).

  Returns the logits after each row's last prompt token ([B, V] float32, at position
  lengths_B - 1: the output layer runs on B rows, not B*P: [B, P, V] float32 logits are
  68 GB at B=256, P=512 and a 130k vocabulary), one MLACache per stack ([n, B, cache_len,
  ...], slots 0..P-1 filled) and per stack its routing ([n, B, P, ...] ids; None for dense
  stacks)."""
  B, P = tokens_BxP.shape
  positions_BxP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
  x_BxPxD = _embed(model, tokens_BxP)
  caches, routes = [], []
  for stack in model.stacks:
    graphdef, state = nnx.split(stack.layers)

    def body(x_BxPxD, layer_state, graphdef=graphdef):
      block = nnx.merge(graphdef, layer_state)
      a_BxPxD, _, cache_BxP = block.attn(block.attn_norm(x_BxPxD), positions_BxP,
                                         return_latent=True)
      x_BxPxD = x_BxPxD + a_BxPxD
      y_BxPxD, ids = _ffn(block, block.ffn_norm(x_BxPxD))
      return x_BxPxD + y_BxPxD, (cache_BxP, ids)

    x_BxPxD, (cache_nxBxP, ids) = jax.lax.scan(body, x_BxPxD, state)
    pad = ((0, 0), (0, 0), (0, cache_len - P), (0, 0))
    caches.append(jax.tree.map(lambda a: jnp.pad(a, pad), cache_nxBxP))
    routes.append(ids)
  last_BxD = x_BxPxD[jnp.arange(B), lengths_B - 1]
  return _logits(model, last_BxD[:, None])[:, 0], caches, routes


def decode_step(model: Transformer, tokens_B: jax.Array, positions_B: jax.Array,
                caches: list, expert_backend: str | None = None, layers: list | None = None,
                greedy: str | None = None):
  """One token per row at its position: logits [B, V] float32 (with `greedy`, one of
  GREEDY_HEADS: the greedy tokens [B] int32 instead, `greedy_tokens`), the updated caches
  and per stack the routing ([n, B, 1, ...] ids; None for dense stacks). `expert_backend`:
  None (model.expert_backend), "all_experts" (`dispatch.all_experts`), "capacity"
  (`dispatch.capacity_experts`) or "auto" (one of these two by the batch:
  `decode_expert_backend`).

  `layers` (from `unstack_layers`): each stack's layers as separate per-layer states, run
  unrolled; `caches` is then per stack a list of per-layer MLACache ([B, S, ...],
  `unstack_caches`). The default scan slices every layer's weights and cache out of the
  stacked arrays inside the step, which XLA may copy (a read and a write of every weight
  each step); separate buffers need no slice."""
  if layers is not None:
    return _decode_step_unrolled(model, tokens_B, positions_B, caches, expert_backend, layers,
                                 greedy)
  x_Bx1xD = _embed(model, tokens_B[:, None])
  new_caches, routes = [], []
  for stack, cache in zip(model.stacks, caches):
    graphdef, state = nnx.split(stack.layers)

    def body(carry, layer, graphdef=graphdef):
      # The stack's cache is carried, each layer writing its entries in place (`MLA.decode`).
      x_Bx1xD, cache = carry
      layer_state, i = layer
      block = nnx.merge(graphdef, layer_state)
      with jax.named_scope("attention"):
        a_Bx1xD, cache = block.attn.decode(block.attn_norm(x_Bx1xD), positions_B, cache, i)
      x_Bx1xD = x_Bx1xD + a_Bx1xD
      y_Bx1xD, ids = _ffn(block, block.ffn_norm(x_Bx1xD), expert_backend)
      return (x_Bx1xD + y_Bx1xD, cache), ids

    (x_Bx1xD, cache), ids = jax.lax.scan(body, (x_Bx1xD, cache),
                                         (state, jnp.arange(stack.num)))
    new_caches.append(cache)
    routes.append(ids)
  return _output(model, x_Bx1xD, greedy), new_caches, routes


def stacks_experts(m, decode_backend: str | None, batch: int) -> bool:
  """Whether decoding `batch` rows with `decode_backend` reads stacked experts (so
  `unstack_layers` must make them)."""
  return decode_backend == "capacity_kernel" or (
      decode_backend == "auto" and decode_expert_backend(m, batch) == "capacity_kernel")


class DecodeLayer(NamedTuple):
  """One layer's weights for the unrolled decode step (`unstack_layers`)."""
  state: nnx.State  # the layer's own arrays; the attention's projections empty placeholders
  attn: MLADecodeWeights  # ... which are here, in the decode layout and compute dtype
  experts: dispatch.StackedExperts | None  # stacked for the Mosaic GPU kernels, or None


# unstack_layers' compiled steps, made once per process (per tuning / per layer stack's
# structure), not in every call: `generate` unstacks in each call, and a new jax.jit of a
# new function traces and compiles again each time.
@functools.cache
def _stack_experts_fn(tuning: tuple[tuple[str, object], ...]):
  return jax.jit(functools.partial(dispatch.stack_experts, **dict(tuning)))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _layer_decode_weights(attn_graphdef, attn_state, i, absorb):
  """Layer i's attention weights of a stack (`attn_state`, stacked) in the decode layout."""
  return nnx.merge(attn_graphdef, jax.tree.map(lambda a: a[i], attn_state)).decode_weights(
      absorb)


def unstack_layers(model: Transformer, stack_experts: bool = False,
                   kernel_tuning: dict | None = None,
                   absorb: str = "none") -> list[list[DecodeLayer]]:
  """Per stack, its layers as `DecodeLayer`s, separate arrays made here, outside any jit,
  for `decode_step(..., layers=)`. Held while they are alive, besides the model: a copy of
  every layer's weights, the attention's projections (`attention.DECODE_WEIGHT_NAMES`) as
  `MLA.decode_weights` in the compute dtype (the decode layout, in place of their copy in
  the layer's state, where they are zero-size placeholders: the unrolled step reads only
  the prepared ones). stack_experts: each routed layer's expert weights also stacked for
  the Mosaic GPU kernels in the compute dtype (`dispatch.stack_experts`, with
  `kernel_tuning` over its defaults and `model.decode_pdl`: a third copy of the expert
  weights), which decode_backend="capacity_kernel" reads. absorb: the attention's form
  (`MLA.decode_weights(absorb=)`; generate passes model.decode_absorb)."""
  tuning = dict(kernel_tuning or {})
  if model.cfg.model.decode_pdl:
    tuning.setdefault("pdl", 1)
  stack_fn = _stack_experts_fn(tuple(sorted(tuning.items())))
  out = []
  for stack in model.stacks:
    state = nnx.state(stack.layers)
    attn_graphdef, attn_state = nnx.split(stack.layers.attn)

    def layer_copy(path, a, i):
      names = [getattr(k, "key", None) for k in path[:2]]
      if names[0] == "attn" and names[1] in DECODE_WEIGHT_NAMES:
        return jnp.zeros((0,), a.dtype)
      return a[i]

    layers = []
    for i in range(stack.num):
      layer_state = jax.tree_util.tree_map_with_path(functools.partial(layer_copy, i=i), state)
      stacked = None
      if stack_experts and stack.layers.ffn_kind != "dense":
        ffn = nnx.merge(nnx.graphdef(stack.layers), layer_state).ffn
        stacked = stack_fn([w[...].astype(ffn.dtype) for w in ffn.w_gate_up],
                           [w[...].astype(ffn.dtype) for w in ffn.w_down],
                           ffn.router_weights())
      layers.append(DecodeLayer(layer_state,
                                _layer_decode_weights(attn_graphdef, attn_state, i, absorb),
                                stacked))
    out.append(layers)
  return out


def unstack_caches(caches: list[MLACache]) -> list[list[MLACache]]:
  """Per stack, the stacked cache [n, B, S, ...] as n per-layer caches [B, S, ...]."""
  return [[jax.tree.map(lambda c, i=i: c[i], cache) for i in range(len(cache.latent))]
          for cache in caches]


def _decode_step_unrolled(model, tokens_B, positions_B, caches, expert_backend, layers,
                          greedy=None):
  x_Bx1xD = _embed(model, tokens_B[:, None])
  new_caches, routes = [], []
  for stack, stack_caches, stack_layers in zip(model.stacks, caches, layers):
    graphdef = nnx.graphdef(stack.layers)
    updated, ids_n = [], []
    for layer, cache in zip(stack_layers, stack_caches):
      block = nnx.merge(graphdef, layer.state)
      with jax.named_scope("attention"):
        a_Bx1xD, cache = block.attn.decode(block.attn_norm(x_Bx1xD), positions_B, cache,
                                           prepared=layer.attn)
      x_Bx1xD = x_Bx1xD + a_Bx1xD
      y_Bx1xD, ids = _ffn(block, block.ffn_norm(x_Bx1xD), expert_backend, layer.experts)
      x_Bx1xD = x_Bx1xD + y_Bx1xD
      updated.append(cache)
      ids_n.append(ids)
    new_caches.append(updated)
    routes.append(None if ids_n[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *ids_n))
  return _output(model, x_Bx1xD, greedy), new_caches, routes


def _routed(routes_per_stack: list) -> routing.Forced:
  """Per-stack ids -> one routing.Forced over the routed layers in model order."""
  routed = [r for r in routes_per_stack if r is not None]
  return jax.tree.map(lambda *a: jnp.concatenate(a), *routed)


# ----------------------------------------------------------------------------- the loop


# None: model.expert_backend; capacity_kernel: capacity through the Mosaic GPU kernels
DECODE_BACKENDS = ("auto", None, "all_experts", "capacity", "capacity_kernel")


def generate(model: Transformer, prompts_BxP, lengths_B, key: jax.Array, *,
             max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, stop_ids: tuple[int, ...] = (), pad_id: int = 0,
             record_routes: bool = False, return_mask: bool = True,
             decode_backend: str | None = "auto", unrolled: bool = True) -> Generated:
  """Samples max_new_tokens per row (fewer when a row draws one of `stop_ids`: it is
  kept, then the row stops). prompts_BxP: right-padded int prompts, lengths_B >= 1 their
  lengths. One jit-compiled program per (shapes, sampler settings).

  decode_backend: the experts' backend of the decode steps ("auto": by the batch,
  `decode_expert_backend`; None: model.expert_backend; "all_experts", "capacity",
  "capacity_kernel"; `decode_step`). unrolled (default): the decode steps run the layers
  unrolled over separate per-layer copies of the weights (`unstack_layers`, made here: the
  weights are held twice while generating, the expert weights three times when the
  kernels read them stacked); False: the layer scan over the stacked weights, which on
  the H200 took 1.8x as long a step (MoHGE-3B, batch 256: 10.9 ms against 6.0), without
  capacity_kernel."""
  _check_model(model)
  if decode_backend not in DECODE_BACKENDS:
    raise ValueError(f"decode_backend={decode_backend!r}: must be one of {DECODE_BACKENDS}")
  graphdef, state = nnx.split(model)
  prompts_BxP = jnp.asarray(prompts_BxP, jnp.int32)
  lengths_B = jnp.asarray(lengths_B, jnp.int32)
  S = prompts_BxP.shape[1] + max_new_tokens
  if S > model.cfg.model.max_seq_len:
    raise ValueError(f"prompt length {prompts_BxP.shape[1]} + max_new_tokens "
                     f"{max_new_tokens} exceeds model.max_seq_len={model.cfg.model.max_seq_len}")
  if decode_backend == "capacity_kernel" and not unrolled:
    raise ValueError("decode_backend='capacity_kernel' needs unrolled=True (the experts "
                     "are stacked per layer once, before the decode loop)")
  m = model.cfg.model
  layers = (unstack_layers(model, absorb=m.decode_absorb, stack_experts=stacks_experts(
      m, decode_backend, prompts_BxP.shape[0])) if unrolled else None)
  return _generate(graphdef, state, layers, prompts_BxP, lengths_B, key,
                   max_new_tokens=max_new_tokens, temperature=float(temperature),
                   top_k=int(top_k), top_p=float(top_p),
                   stop_ids=tuple(int(i) for i in stop_ids), pad_id=int(pad_id),
                   record_routes=bool(record_routes), return_mask=bool(return_mask),
                   decode_backend=decode_backend, unroll=decode_unroll(),
                   greedy_head=GREEDY_HEAD if temperature == 0 else None)


# XLA records a GPU program's kernels into command buffers (CUDA graphs). By default
# ("LHS") a buffer's kernels run one after another in program order; under "CONCURRENT" the
# graph's edges are the kernels' data dependencies, so kernels that do not depend on each
# other overlap: the decode step is ~650 kernels, most of a few microseconds, and several
# run beside each other (a routed layer's shared experts beside its routing and dispatch).
# On the H200, MoHGE-3B's decode step at batch 256: 4.08-4.10 ms -> 3.87 ms, peak memory
# +0.1 GB (benchmarks/notes_generate.md, fourteenth session). Options of the decode
# programs only (`decode_compiler_options`), not of training's.
DECODE_COMPILER_OPTIONS = {"xla_gpu_command_buffer_scheduling_mode": "CONCURRENT"}


def decode_compiler_options() -> dict[str, str]:
  """`jax.jit(compiler_options=)` for programs that decode: DECODE_COMPILER_OPTIONS on a
  GPU backend, none elsewhere."""
  return dict(DECODE_COMPILER_OPTIONS) if jax.default_backend() == "gpu" else {}


# Decode steps a loop iteration on a GPU. XLA runs the decode loop's `while` outside the
# command buffers: between iterations, where the body's CUDA graph is launched again, the
# GPU idled ~60 us, ~2% of a MoHGE-3B step at batch 256 on the H200; two steps an
# iteration: 3.227-3.301 ms a step against 3.294-3.369 (twenty-sixth session, each its own
# process; benchmarks/notes_generate.md). Elsewhere 1 (compile time: the CPU tests).
DECODE_UNROLL = 2


# The output layer of `generate`'s greedy decode steps (temperature 0; `greedy_tokens`):
# read per call (a static argument of the compiled program).
GREEDY_HEAD = "auto"


def decode_unroll() -> int:
  """`lax.scan(unroll=)` of the decode loops: DECODE_UNROLL on a GPU backend, else 1."""
  return DECODE_UNROLL if jax.default_backend() == "gpu" else 1


def _generate(graphdef, state, layers, prompts_BxP, lengths_B, key, **kw):
  return _generate_jit(tuple(sorted(decode_compiler_options().items())))(
      graphdef, state, layers, prompts_BxP, lengths_B, key, **kw)


@functools.cache
def _generate_jit(compiler_options: tuple[tuple[str, str], ...]):
  return jax.jit(_generate_fn, static_argnums=0, static_argnames=(
      "max_new_tokens", "temperature", "top_k", "top_p", "stop_ids", "pad_id", "record_routes",
      "return_mask", "decode_backend", "unroll", "greedy_head"), compiler_options=dict(compiler_options) or None)


def _generate_fn(graphdef, state, layers, prompts_BxP, lengths_B, key, *, max_new_tokens,
              temperature, top_k, top_p, stop_ids, pad_id, record_routes, return_mask,
              decode_backend, unroll, greedy_head):
  model = nnx.merge(graphdef, state)
  B, P = prompts_BxP.shape
  S = P + max_new_tokens
  rows_B = jnp.arange(B)
  draw = functools.partial(sample, vocab_size=model.cfg.model.vocab_size,
                           temperature=temperature, top_k=top_k, top_p=top_p)

  logits_BxV, caches, prompt_routes = prefill(model, prompts_BxP, lengths_B, cache_length(S))
  V = logits_BxV.shape[-1]
  if layers is not None:
    caches = unstack_caches(caches)
  routes = None
  if record_routes:  # [R, B, S, ...], slots 0..P-1 from the prompt, the rest written below
    pad = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, S - P), (0, 0)))  # noqa: E731
    routes = jax.tree.map(pad, _routed(prompt_routes))
  key, sub = jax.random.split(key)
  first = draw(sub, logits_BxV)

  def step(carry, _):
    (tokens_B, logp_B, allowed_BxV), positions_B, caches, routes, done_B, key = carry
    alive_B = ~done_B
    out = (jnp.where(alive_B, tokens_B, pad_id), jnp.where(alive_B, logp_B, 0.0),
           (allowed_BxV & alive_B[:, None]) if return_mask else None, alive_B)
    done_B = done_B | jnp.isin(tokens_B, jnp.asarray(stop_ids or (-1,), jnp.int32))
    # Feed the token (also the last one: its routing completes `routes`). Greedy: the
    # output layer gives the tokens (`greedy_tokens`), the logits are not made.
    out_B, caches, step_routes = decode_step(model, tokens_B, positions_B, caches,
                                             decode_backend, layers=layers,
                                             greedy=greedy_head)
    if routes is not None:
      routes = jax.tree.map(lambda buf, ids: buf.at[:, rows_B, positions_B].set(ids[:, :, 0]),
                            routes, _routed(step_routes))
    key, sub = jax.random.split(key)
    drawn = (draw(sub, out_B) if temperature else   # as `sample` at temperature 0
             (out_B, jnp.zeros((B,), jnp.float32), jax.nn.one_hot(out_B, V, dtype=jnp.bool_)))
    return (drawn, positions_B + 1, caches, routes, done_B, key), out

  carry = (first, lengths_B, caches, routes, jnp.zeros((B,), jnp.bool_), key)
  carry, (tokens_NxB, logp_NxB, allowed_NxBxV, alive_NxB) = jax.lax.scan(
      step, carry, None, length=max_new_tokens, unroll=unroll)
  mask_BxNxV = None if allowed_NxBxV is None else jnp.swapaxes(allowed_NxBxV, 0, 1)
  return Generated(tokens=tokens_NxB.T, logprobs=logp_NxB.T, sampling_mask=mask_BxNxV,
                   lengths=alive_NxB.sum(0, dtype=jnp.int32), routes=carry[3])


def sequences(prompts_BxP, lengths_B, out: Generated, pad_id: int = 0) -> np.ndarray:
  """Each row's whole sequence, prompt[:length] then its generated tokens, right-padded
  with pad_id: int32 [B, P + N], the layout of `out.routes`."""
  prompts_BxP, lengths_B = np.asarray(prompts_BxP), np.asarray(lengths_B)
  tokens_BxN, gen_B = np.asarray(out.tokens), np.asarray(out.lengths)
  B, P = prompts_BxP.shape
  seq = np.full((B, P + tokens_BxN.shape[1]), pad_id, np.int32)
  for b in range(B):
    seq[b, :lengths_B[b]] = prompts_BxP[b, :lengths_B[b]]
    seq[b, lengths_B[b]:lengths_B[b] + gen_B[b]] = tokens_BxN[b, :gen_B[b]]
  return seq


def pad_prompts(prompts: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Token lists -> right-padded int32 [B, P] and lengths [B]."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  P = max(len(p) for p in prompts)
  out = np.full((len(prompts), P), pad_id, np.int32)
  for b, p in enumerate(prompts):
    out[b, :len(p)] = p
  return out, np.asarray([len(p) for p in prompts], np.int32)


# ----------------------------------------------------------------------------- loading, CLI


def load_model(path: str | Path) -> tuple[Transformer, object]:
  """An export directory (config.json + model.safetensors) or a training workdir (its
  latest complete checkpoint), as (model, cfg) with float32 parameters."""
  path = Path(path)
  from mohge_jax import export
  if (path / "model.safetensors").is_file():
    return export.load(path)
  from mohge_jax.checkpoint import CheckpointError
  from mohge_jax.trainer import graph_def
  if not (path / "checkpoints").is_dir():
    raise CheckpointError(f"{path} is neither an export (model.safetensors) nor a training "
                          "workdir (checkpoints/)")
  params, cfg = export.restore_params(path)
  return nnx.merge(graph_def(cfg), params), cfg


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog="python -m mohge_jax.generate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("model", help="a training workdir or an export directory")
  p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
  p.add_argument("--batch-file", help="a text file, one prompt per line (\\n escapes newlines)")
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
  p.add_argument("--top-k", type=int, default=0, help="0: no top-k")
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--decode-backend", default="auto",
                 choices=["model" if b is None else b for b in DECODE_BACKENDS],
                 help="the decode steps' expert backend: auto (by the batch: capacity from 8 "
                      "routed rows per expert, through the Mosaic GPU kernels on Hopper, else "
                      "all_experts; on Hopper below one pair per expert the kernels on the "
                      "chosen experts only), model (model.expert_backend), all_experts, "
                      "capacity, capacity_kernel")
  p.add_argument("--scan-layers", action="store_true",
                 help="decode with the layer scan over the stacked weights (less memory: "
                      "the default unrolled decode holds the weights twice; slower)")
  args = p.parse_args(argv)
  texts = list(args.prompt)
  if args.batch_file:
    texts += [line.rstrip("\n").replace("\\n", "\n")
              for line in Path(args.batch_file).read_text().splitlines() if line.strip()]
  if not texts:
    p.error("give at least one --prompt or a --batch-file")
  if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
    p.error("need --temperature >= 0, 0 < --top-p <= 1, --top-k >= 0")

  from mohge_jax.checkpoint import CheckpointError
  from mohge_jax.data import make_tokenizer
  try:
    model, cfg = load_model(args.model)
    tok = make_tokenizer(cfg.data.tokenizer, cfg.data.eos_token)
  except (CheckpointError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  prompts_BxP, lengths_B = pad_prompts([tok.encode(t) for t in texts])
  try:
    out = generate(model, prompts_BxP, lengths_B, jax.random.key(args.seed),
                   max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, stop_ids=(tok.eos_id,),
                   return_mask=False,
                   decode_backend=None if args.decode_backend == "model" else args.decode_backend,
                   unrolled=not args.scan_layers)
  except (ValueError, NotImplementedError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  tokens_BxN, gen_B = np.asarray(out.tokens), np.asarray(out.lengths)
  for b, text in enumerate(texts):
    ids = [int(i) for i in tokens_BxN[b, :gen_B[b]] if i != tok.eos_id]
    print(f"=== prompt {b}: {text!r}")
    print(text + tok.decode(ids))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
