"""The DSA sparse-attention Mosaic GPU kernel on a Hopper GPU against the pure-JAX reference,
in the same run (skipped without one): o_lat, p and gradients at MoHGE-3B head shapes, with
the causal top-k of random indexer scores (ragged: the first K-1 queries have fewer keys)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from mohge_jax import sparse_attention as dsa

pytestmark = pytest.mark.gpu
if not pk.resolve_backend("auto") == "mosaic_gpu":
  pytest.skip("needs a Hopper GPU", allow_module_level=True)


def _rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  assert np.isfinite(a).all()
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("B,T,K", [(2, 1000, 256), (1, 4096, 2048)])
def test_sparse_mla_kernel_matches_reference(rng, B, T, K):
  H, C, R, J, I = 16, 512, 64, 4, 64
  bf = lambda *s, sd=1.0: jnp.asarray(sd * rng.normal(size=s), jnp.bfloat16)  # noqa: E731
  q_lat, q_rope = bf(B, T, H, C, sd=C ** -0.5), bf(B, T, H, R, sd=R ** -0.5)
  c, kr = bf(B, T, C), bf(B, T, R)
  idx, valid, _ = dsa.select_topk(bf(B, T, J, I), bf(B, T, J), bf(B, T, I), topk=K, chunk=256)
  g_out = jnp.asarray(rng.normal(size=(B, T, H, C)), jnp.float32)

  def run(impl, args):
    def loss(*a):
      o, p = dsa.sparse_mla(*a, idx, valid, scale=0.3, chunk=256, impl=impl)
      return jnp.sum(o.astype(jnp.float32) * g_out), (o, p)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(*args)

  args = (q_lat, q_rope, c, kr)
  grads, (o, p) = run("pallas", args)
  # float32 reference on the same inputs: the bf16 reference's own gradient of c is ~3% off
  grads_r, (o_r, p_r) = run("reference", [a.astype(jnp.float32) for a in args])
  assert _rel(o, o_r) < 1e-2
  assert _rel(p, p_r) < 1e-2
  for a, b in zip(grads, grads_r):
    assert _rel(a, b) < 2e-2
  assert dsa.resolve_sparse_mla_impl("auto", H, C, R, K, jnp.bfloat16) == "pallas"


def test_kernel_variants_agree(rng):
  """Both splits of C and 1 or 3 column tiles per TMA copy give the same o_lat and LSE
  (bitwise in the GPU interpreter)."""
  from pallas_kernels import sparse_mla_gpu

  B, T, H, C, R, K = 1, 2048, 16, 512, 64, 2048
  bf = lambda *s: jnp.asarray(rng.normal(size=s) / np.sqrt(s[-1]), jnp.bfloat16)  # noqa: E731
  q_lat, q_rope, ckr = bf(B, T, H, C), bf(B, T, H, R), bf(B, T, C + R)
  idx = jnp.asarray(rng.integers(0, T, size=(B, T, K)), jnp.int32)
  idx = jnp.where(idx <= jnp.arange(T)[None, :, None], idx, -1).at[:, :, 0].set(jnp.arange(T))
  outs = [sparse_mla_gpu.sparse_mla_fwd(q_lat, q_rope, ckr, idx, scale=0.1, split=split,
                                        tiles_per_copy=tpc)
          for split in sparse_mla_gpu.SPLITS for tpc in (1, 3)]
  for o, lse in outs[1:]:  # the same products in the same order: equal up to rounding
    assert _rel(o, outs[0][0]) < 1e-6
    np.testing.assert_allclose(lse, outs[0][1], rtol=1e-6)
