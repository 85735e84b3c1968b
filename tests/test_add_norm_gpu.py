"""pallas_kernels/add_norm_gpu.py, the residual add and the RMSNorm after it in one Triton
kernel: in Pallas' interpreter against the plain-JAX reference and `attention.RMSNorm`
(ragged rows, bf16 and float32), its CUDA lowering, its refusals; the unrolled decode step
through it (model.decode_fused_norm) against the step without it."""
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mohge_jax import generate as gen
from mohge_jax.attention import RMSNorm
from pallas_kernels import add_norm_gpu as an
from tests.test_generate import make_model, ragged


@pytest.mark.parametrize("dtype,M,D", [(jnp.bfloat16, 19, 256), (jnp.float32, 8, 64)])
def test_interpreted_equals_reference_and_rmsnorm(rng, dtype, M, D):
  x = jnp.asarray(rng.normal(size=(M, D)) * 3.0, dtype)
  a = jnp.asarray(rng.normal(size=(M, D)), dtype)
  norm = RMSNorm(D, eps=1e-6, dtype=jnp.bfloat16)
  norm.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, size=D), jnp.float32)
  h, n = an.add_rms_norm(x, a, norm.scale[...], eps=1e-6, out_dtype=jnp.bfloat16,
                         interpret=True)
  want_h, want_n = an.reference(x, a, norm.scale[...], eps=1e-6, out_dtype=jnp.bfloat16)
  assert h.dtype == dtype and n.dtype == jnp.bfloat16 and h.shape == n.shape == (M, D)
  np.testing.assert_array_equal(np.asarray(h), np.asarray(x + a))   # the add, exactly
  np.testing.assert_array_equal(np.asarray(h), np.asarray(want_h))
  # the norm: RMSNorm's numbers, up to the order of the mean's sum (a bf16 step at most)
  for ref in (want_n, norm(x + a)):
    np.testing.assert_allclose(np.asarray(n, np.float32), np.asarray(ref, np.float32),
                               rtol=2 ** -7, atol=0)


def test_lowers_for_cuda_and_refuses_other_widths():
  from jax._src.pallas.triton import gpu_info, pallas_call_registration as reg
  info = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion("NVIDIA H100"))
  sds = jax.ShapeDtypeStruct
  with mock.patch.object(reg.gpu_info_lib, "get_gpu_info", lambda: info):
    text = jax.jit(lambda x, a, s: an.add_rms_norm(x, a, s, eps=1e-6,
                                                   out_dtype=jnp.bfloat16)).trace(
        sds((256, 1024), jnp.bfloat16), sds((256, 1024), jnp.bfloat16),
        sds((1024,), jnp.float32)).lower(lowering_platforms=("cuda",)).as_text()
  assert "add_rms_norm" in text
  with pytest.raises(ValueError, match="width must be a power of two.*got 96"):
    an.add_rms_norm(jnp.zeros((4, 96)), jnp.zeros((4, 96)), jnp.ones(96), eps=1e-6,
                    out_dtype=jnp.float32)
  with pytest.raises(ValueError, match="scale \\[D\\]"):
    an.add_rms_norm(jnp.zeros((4, 64)), jnp.zeros((4, 64)), jnp.ones(32), eps=1e-6,
                    out_dtype=jnp.float32)


def test_decode_step_with_the_fused_norm_equals_without(rng, monkeypatch):
  """The unrolled decode step with every residual add and its next norm (the next layer's
  attention norm, the final norm at the end) through the kernel (interpreted): the same
  logits and routes as XLA's adds and norms; model.decode_fused_norm off or off the GPU:
  no kernel."""
  model = make_model(int(rng.integers(1 << 30)), ["model.first_dense_layers=1",
                                                   "model.decode_fused_norm=true"])
  assert gen._add_norm_kernel(model) is None   # (this host has no GPU)
  calls = []

  def interpreted(*a, **k):
    calls.append(1)
    return an.add_rms_norm(*a, **k, interpret=True)
  B, P, N = 3, 5, 1
  prompts, lens = ragged(rng, [5, 2, 4], P)
  fed = rng.integers(0, 256, size=(B, N))
  _, caches, _ = gen.prefill(model, jnp.asarray(prompts), jnp.asarray(lens), P + N)
  layers, flat = gen.unstack_layers(model), gen.unstack_caches(caches)

  def run():   # N steps of a freshly jitted step (traced under the patch or not)
    step, cache, out = nnx.jit(gen.decode_step), flat, []
    for t in range(N):
      logits, cache, routes = step(model, jnp.asarray(fed[:, t]), jnp.asarray(lens + t), cache,
                                   layers=layers)
      out.append((logits, [r for r in routes if r is not None]))
    return out
  want = run()
  monkeypatch.setattr(gen, "_add_norm_kernel", lambda m: interpreted)
  got = run()
  for (g, g_routes), (w, w_routes) in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-2, atol=2e-2)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 g_routes, w_routes)
  L = model.cfg.model.num_layers   # each trace of the step: every layer's two adds
  assert calls and len(calls) % (2 * L) == 0


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")
def test_kernel_equals_reference_on_the_gpu(rng):
  """On the GPU at MoHGE-3B's decode shapes (256 rows of 1024, bf16), and ragged rows."""
  for M in (256, 77):
    x = jnp.asarray(rng.normal(size=(M, 1024)) * 3.0, jnp.bfloat16)
    a = jnp.asarray(rng.normal(size=(M, 1024)), jnp.bfloat16)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, size=1024), jnp.float32)
    h, n = an.add_rms_norm(x, a, scale, eps=1e-6, out_dtype=jnp.bfloat16)
    want_h, want_n = jax.jit(lambda *t: an.reference(*t, eps=1e-6, out_dtype=jnp.bfloat16))(
        x, a, scale)
    np.testing.assert_array_equal(np.asarray(h), np.asarray(want_h))
    np.testing.assert_allclose(np.asarray(n, np.float32), np.asarray(want_n, np.float32),
                               rtol=2 ** -7, atol=0)
