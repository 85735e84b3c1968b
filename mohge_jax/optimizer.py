"""AdamW with linear warm-up and cosine decay (spec §5), global-norm clipping, and weight
decay on matrices only (never on norm scales; on the embedding table only with
`train.decay_embedding`, as Megatron and the reference do)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mohge_jax.config import TrainConfig


def lr_schedule(t: TrainConfig) -> optax.Schedule:
  """The learning rate of step s (0-based: the first update is step 0), W = warmup_steps.

  s < W: lr * (s + 1) / W, a linear warm-up that already moves the parameters at step 0
  and reaches lr at step W - 1. s >= W: cosine from lr (at step W) to min_lr (at
  train.steps), min_lr after. W = 0: no warm-up, the cosine starts at lr at step 0.
  """
  lr, min_lr, warmup = t.lr, t.min_lr, t.warmup_steps
  decay_steps = max(t.steps - warmup, 1)

  def schedule(step):
    s = jnp.asarray(step, jnp.float32)
    warm = lr * (s + 1.0) / max(warmup, 1)
    frac = jnp.clip((s - warmup) / decay_steps, 0.0, 1.0)
    cosine = min_lr + (lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    return jnp.where(s < warmup, warm, cosine)
  return schedule


def decay_mask(params, *, decay_embedding: bool = False):
  """True for parameters that get weight decay: matrices (2+ dimensions), the embedding
  table only when `decay_embedding`. A stack of scanned layers (`stacks/<i>/layers/...`)
  adds a leading axis that is not counted: its norm scales are vectors per layer."""
  def is_decayed(path, leaf) -> bool:
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    ndim = leaf.ndim - ("layers" in names)
    return ndim >= 2 and (decay_embedding or "embed" not in names)
  return jax.tree_util.tree_map_with_path(is_decayed, params)


def is_indexer(path) -> bool:
  """A DSA lightning indexer parameter (`.../attn/indexer/...`)?"""
  return any(str(getattr(k, "key", getattr(k, "name", k))) == "indexer" for k in path)


def make_optimizer(t: TrainConfig, *, only_indexer: bool = False) -> optax.GradientTransformation:
  """AdamW as above. only_indexer (DSA's dense warm-up): the indexer's parameters train
  (clipped on their own norm), every other parameter is frozen: no update, no weight decay
  and no optimizer moments (optax.multi_transform with set_to_zero)."""
  tx = optax.chain(
      optax.clip_by_global_norm(t.grad_clip),
      optax.adamw(lr_schedule(t), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                  mask=lambda p: decay_mask(p, decay_embedding=t.decay_embedding)),
  )
  if not only_indexer:
    return tx
  labels = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
      lambda path, _: "train" if is_indexer(path) else "frozen", params)
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
