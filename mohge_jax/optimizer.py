"""AdamW with linear warm-up and cosine decay (spec §5), global-norm clipping, and weight
decay on matrices only (not on norm scales, nor on the embedding table)."""

from __future__ import annotations

import jax
import optax

from mohge_jax.config import TrainConfig


def lr_schedule(t: TrainConfig) -> optax.Schedule:
  """0 -> lr over warmup_steps, then cosine from lr to min_lr at train.steps."""
  warmup = max(t.warmup_steps, 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.lr, warmup_steps=warmup,
      decay_steps=max(t.steps, warmup + 1), end_value=t.min_lr)


def decay_mask(params):
  """True for parameters that get weight decay: matrices, except the embedding table. A
  stack of scanned layers (`stacks/<i>/layers/...`) adds a leading axis that is not counted:
  its norm scales are vectors per layer."""
  def is_decayed(path, leaf) -> bool:
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    ndim = leaf.ndim - ("layers" in names)
    return ndim >= 2 and "embed" not in names
  return jax.tree_util.tree_map_with_path(is_decayed, params)


def make_optimizer(t: TrainConfig) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(t.grad_clip),
      optax.adamw(lr_schedule(t), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                  mask=decay_mask),
  )
