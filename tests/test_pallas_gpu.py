"""Mosaic GPU kernels on a Hopper GPU against the reference, in the same run (skipped
without a GPU). Fresh random inputs: empty and one-row experts, ragged tiles, padding."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import reference as R
from test_pallas_kernels import _sizes

pytestmark = pytest.mark.gpu
if not pk.resolve_backend("auto") == "mosaic_gpu":
  pytest.skip("needs a Hopper GPU", allow_module_level=True)


def _problem(rng, widths=(256, 384, 512), n=4, d=512, m=3000, padding=123):
  gs = _sizes(rng, len(widths) * n, m, padding, concentration=0.5)
  nrm = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  x = nrm(m, d).astype(jnp.bfloat16)
  wgu = tuple((nrm(n, d, 2 * w) / np.sqrt(d)).astype(jnp.bfloat16) for w in widths)
  wd = tuple((nrm(n, w, d) / np.sqrt(w)).astype(jnp.bfloat16) for w in widths)
  ct = nrm(m, d).astype(jnp.bfloat16)
  return gs, x, wgu, wd, ct


def _err(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  assert np.isfinite(a).all()
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _fb(backend, gs, **tuning):
  def run(ct, x, wgu, wd):
    y, vjp = jax.vjp(lambda *a: pk.expert_ffn(a[0], gs, *a[1:], backend=backend, **tuning),
                     x, wgu, wd)
    return y, vjp(ct)
  return jax.jit(run)


@pytest.mark.parametrize("widths,n,cfg", [
    ((256, 384, 512), 4, {}),
    ((256, 384, 512), 4, dict(bm=64, bn=128, bn_up=128)),
    ((256, 384, 512), 4, dict(bt=128, steps_t=3)),
    ((512,), 6, {}),  # one group: weights stacked by rows (the other orientation)
    ((256, 384, 512), 4, dict(zero_padding=False)),  # padding rows left unwritten
])
def test_expert_ffn_matches_reference(rng, widths, n, cfg):
  zero = cfg.get("zero_padding", True)
  gs, x, wgu, wd, ct = _problem(rng, widths=widths, n=n, padding=123 if zero else 1500)
  total = int(gs.sum())
  if not zero:  # half the rows padding, as expert parallelism's buffers at EP 2; the
    ct = ct.at[total:].set(0)  # caller masks them (expert_parallel._local_ffn)
  y, grads = _fb("mosaic_gpu", gs, **cfg)(ct, x, wgu, wd)
  y_r, grads_r = _fb("reference", gs)(ct, x, wgu, wd)
  assert _err(y[:total], y_r[:total]) < 1e-2
  assert _err(grads[0][:total], grads_r[0][:total]) < 2e-2
  for a, b in zip(jax.tree.leaves(grads[1:]), jax.tree.leaves(grads_r[1:])):
    assert _err(a, b) < 2e-2
  if zero:
    assert not np.asarray(y[total:], np.float32).any()
    assert not np.asarray(grads[0][total:], np.float32).any()


def test_moe_equal_widths_and_forward_only(rng):
  gs, x, wgu, wd, _ = _problem(rng, widths=(512,), n=8, m=2048, padding=0)
  y = jax.jit(lambda x: pk.expert_ffn(x, gs, wgu, wd))(x)  # auto → mosaic_gpu
  assert _err(y, R.expert_ffn_ref(x, gs, wgu, wd)) < 1e-2


def test_under_shard_map(rng):
  gs, x, wgu, wd, _ = _problem(rng, m=1024, padding=10)
  mesh = jax.make_mesh((1,), ("ep",))
  spec = jax.sharding.PartitionSpec()
  f = jax.jit(jax.shard_map(lambda x, a, b: pk.expert_ffn(x, gs, a, b), mesh=mesh,
                            in_specs=(spec, spec, spec), out_specs=spec))
  assert _err(f(x, wgu, wd), R.expert_ffn_ref(x, gs, wgu, wd)) < 1e-2


@pytest.mark.parametrize("m", [1, 6, 192, 1536])
def test_forward_at_decode_sizes(rng, m):
  """Decode batches of 1, 1, 32 and 256 tokens x top-6 (1 to 1,536 rows, fewer than one
  128-row tile per expert): the forward pass on the device (TMA loads past the last row)."""
  widths, n, d = (384, 512, 640), 4, 512
  e = len(widths) * n
  gs = jnp.asarray(rng.multinomial(m, np.full(e, 1 / e)), jnp.int32)
  nrm = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
  x = nrm(m, d).astype(jnp.bfloat16)
  wgu = tuple((nrm(n, d, 2 * w) / np.sqrt(d)).astype(jnp.bfloat16) for w in widths)
  wd = tuple((nrm(n, w, d) / np.sqrt(w)).astype(jnp.bfloat16) for w in widths)
  y = jax.jit(lambda x: pk.expert_ffn(x, gs, wgu, wd, backend="mosaic_gpu"))(x)
  assert _err(y, R.expert_ffn_ref(x, gs, wgu, wd)) < 1e-2


@pytest.mark.parametrize("kernel", ["slot", "hgmm"])
def test_capacity_experts_through_the_kernels_at_decode(rng, kernel):
  """decode_backend="capacity_kernel"'s expert step on the device: MoHGE-3B's widths,
  batch 256 x top-6 over 64 experts, slot blocks of 64 rows through the stacked-weight
  kernels (`slot_gpu`'s copy ring an SM, or the training kernels), against XLA's
  capacity path (float32 products of the same bf16 operands)."""
  from mohge_jax import dispatch
  widths, n, d, T, K = (384, 512, 640, 768, 896, 1024, 1152, 1280), 8, 1024, 256, 6
  e = len(widths) * n
  ids = jnp.asarray(np.stack([rng.choice(e, K, replace=False) for _ in range(T)]), jnp.int32)
  w = jnp.asarray(rng.dirichlet(np.ones(K), size=T), jnp.float32)
  nrm = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
  x = nrm(T, d).astype(jnp.bfloat16)
  wgu = [(nrm(n, d, 2 * f) / np.sqrt(d)).astype(jnp.bfloat16) for f in widths]
  wd = [(nrm(n, f, d) / np.sqrt(f)).astype(jnp.bfloat16) for f in widths]
  stacked = jax.jit(functools.partial(dispatch.stack_experts, kernel=kernel))(wgu, wd)
  got = jax.jit(lambda x, s: dispatch.capacity_experts(x, ids, w, wgu, wd, stacked=s))(
      x, stacked)
  f32 = [[a.astype(jnp.float32) for a in ws] for ws in (wgu, wd)]
  want = dispatch.capacity_experts(x.astype(jnp.float32), ids, w, *f32)
  assert _err(got, want) < 1e-2


@pytest.mark.parametrize("pdl", [False, True])
def test_slot_gmm_on_the_device(rng, pdl):
  """The decode kernels (`slot_gpu`) compiled for the GPU: slot blocks of two row tiles an
  expert (C = 128), up projection with SwiGLU and down projection, against the reference:
  the copy ring across items and the two output buffers run for real here (the
  interpreter stores synchronously). pdl: launched with programmatic dependent launch, the
  lhs made by an XLA kernel just before in the same program (x doubled), so a missing
  wait would read it unfinished."""
  from pallas_kernels import gpu, slot_gpu
  widths, n, d, rows = (384, 512, 640, 768, 896, 1024, 1152, 1280), 8, 1024, 128
  e = len(widths) * n
  gs = jnp.full((e,), rows, jnp.int32)
  nrm = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
  x = nrm(e * rows, d).astype(jnp.bfloat16)
  wgu = tuple((nrm(n, d, 2 * w) / np.sqrt(d)).astype(jnp.bfloat16) for w in widths)
  wd = tuple((nrm(n, w, d) / np.sqrt(w)).astype(jnp.bfloat16) for w in widths)
  cfg = gpu.Config(bm=64)
  doubled = lambda a: (a.astype(jnp.float32) * 2).astype(jnp.bfloat16)  # noqa: E731 - exact
  up = slot_gpu.tile_weights(*gpu.stack_weights(wgu), cfg, swiglu=True)
  h = jax.jit(lambda x: slot_gpu.slot_gmm(doubled(x), up, rows_per_expert=rows, swiglu=True,
                                          out_cols=max(widths), cfg=cfg, pdl=pdl))(x)
  h_ref = R.swiglu_ref(R.hgmm_ref(doubled(x), wgu, gs, out_split=True))
  used = np.arange(max(widths))[None] < np.repeat(np.repeat(widths, n), rows)[:, None]
  assert _err(np.where(used, np.asarray(h, np.float32), 0), h_ref) < 1e-2
  down = slot_gpu.tile_weights(*gpu.stack_weights(wd), cfg, swiglu=False)
  y = jax.jit(lambda h: slot_gpu.slot_gmm(doubled(h), down, rows_per_expert=rows,
                                          swiglu=False, out_cols=d, cfg=cfg, pdl=pdl))(
      h_ref.astype(jnp.bfloat16))
  assert _err(y, R.hgmm_ref(doubled(h_ref.astype(jnp.bfloat16)), wd, gs, out_cols=d)) < 1e-2
