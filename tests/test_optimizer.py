"""mohge_jax/optimizer.py: the learning-rate schedule against a float64 transcription, the
first update moves the parameters, weight decay's mask (embedding on request)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mohge_jax.config import TrainConfig, load_config
from mohge_jax.optimizer import decay_mask, lr_schedule, make_optimizer


def np_schedule(s: int, t: TrainConfig) -> float:
  """Linear warm-up lr*(s+1)/W for s < W, then cosine lr -> min_lr over [W, steps]."""
  W = t.warmup_steps
  if s < W:
    return t.lr * (s + 1) / W
  frac = min(max((s - W) / max(t.steps - W, 1), 0.0), 1.0)
  return t.min_lr + (t.lr - t.min_lr) * 0.5 * (1 + np.cos(np.pi * frac))


@pytest.mark.parametrize("warmup", [0, 1, "random"])
def test_lr_schedule_matches_reference(rng, warmup):
  W = int(rng.integers(2, 30)) if warmup == "random" else warmup
  lr = float(rng.uniform(1e-4, 1e-2))
  t = TrainConfig(steps=W + int(rng.integers(1, 300)), warmup_steps=W, lr=lr,
                  min_lr=float(rng.uniform(0, lr)))
  schedule = lr_schedule(t)
  steps = np.arange(t.steps + 5)
  got = np.asarray(jax.vmap(schedule)(jnp.asarray(steps)))
  want = np.array([np_schedule(int(s), t) for s in steps])
  # float32 cosine: its rounding is relative to lr, not to the (possibly tiny) value.
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6 * t.lr)
  # Step 0 already trains: lr/W with a warm-up, lr without one.
  assert float(schedule(0)) == pytest.approx(t.lr / W if W else t.lr, rel=1e-6)
  if W:
    assert float(schedule(W - 1)) == pytest.approx(t.lr, rel=1e-6)
  assert float(schedule(t.steps)) == pytest.approx(t.min_lr, rel=1e-5, abs=1e-12)


def test_first_update_moves_the_parameters(rng):
  """Step 0 is AdamW's sign-like first step at lr/W: p - lr0 * (g/(|g|+eps) + wd*p)."""
  W = int(rng.integers(1, 20))
  t = TrainConfig(steps=100, warmup_steps=W, lr=1e-3, min_lr=1e-4, weight_decay=0.1,
                  grad_clip=1e9)
  p = {"w": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)}
  g = {"w": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)}
  tx = make_optimizer(t)
  updates, _ = tx.update(g, tx.init(p), p)
  new = np.asarray(p["w"] + updates["w"], np.float64)
  p64, g64, lr0 = np.asarray(p["w"], np.float64), np.asarray(g["w"], np.float64), t.lr / W
  want = p64 - lr0 * (g64 / (np.abs(g64) + 1e-8) + t.weight_decay * p64)
  np.testing.assert_allclose(new, want, rtol=1e-5, atol=1e-7)
  assert np.all(np.abs(new - p64) > 0.5 * lr0)


def test_weight_decay_mask_skips_norms_and_embedding_unless_asked():
  cfg = load_config("configs/tiny.yaml")
  from mohge_jax.trainer import make_init_fn
  params = jax.eval_shape(make_init_fn(cfg))["params"]
  for decay_embedding in (False, True):
    mask = decay_mask(params, decay_embedding=decay_embedding)
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
    assert any("embed" in k for k in flat) and any("scale" in k for k in flat)
    assert all(not v for k, v in flat.items() if "scale" in k)
    assert all(v == decay_embedding for k, v in flat.items() if "embed" in k)
    assert all(v for k, v in flat.items() if "w_" in k or "head" in k or "router" in k)


@pytest.mark.parametrize("decay_embedding", [False, True])
def test_decay_embedding_decays_the_table(rng, decay_embedding):
  """With a zero gradient, the only update is weight decay: -lr0 * wd * p where decayed."""
  t = TrainConfig(steps=10, warmup_steps=0, lr=1e-2, min_lr=1e-3, weight_decay=0.1,
                  decay_embedding=decay_embedding)
  p = {"embed": jnp.asarray(rng.normal(size=(7, 4)), jnp.float32),
       "head": jnp.asarray(rng.normal(size=(4, 7)), jnp.float32),
       "scale": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
  tx = make_optimizer(t)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)
  for name, decayed in (("embed", decay_embedding), ("head", True), ("scale", False)):
    want = -t.lr * t.weight_decay * np.asarray(p[name]) if decayed else 0.0
    np.testing.assert_allclose(np.asarray(updates[name]), want, rtol=1e-5, atol=1e-12,
                               err_msg=name)


def test_paper_configs_decay_the_embedding():
  for name in ("mohge_3b", "moe_3b"):
    assert load_config(f"configs/{name}.yaml").train.decay_embedding, name
