"""pallas_kernels/mla_decode_gpu.py, the experimental decode attention kernel: its reference
against float64 numpy, the kernel in the GPU interpreter (MMAs as dots) against the
reference and its CUDA lowering here; the kernel against the reference on a Hopper GPU
(skipped without one)."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import mla_decode_gpu as mdk

H, C, R = 16, 512, 64  # MoHGE-3B's heads, latent and rope widths


def _inputs(rng, B, S):
  bf = lambda *s, sd=1.0: jnp.asarray(sd * rng.normal(size=s), jnp.bfloat16)  # noqa: E731
  lengths_B = rng.integers(1, S + 1, size=B)  # ragged: each row sees slots 0..length-1
  lengths_B[0] = S
  return (bf(B, H, C, sd=C ** -0.5), bf(B, H, R, sd=R ** -0.5), bf(B, S, C), bf(B, S, R),
          jnp.asarray(lengths_B, jnp.int32))


def test_reference_equals_float64(rng):
  B, S, scale = 3, 128, 0.3
  q_lat, q_rope, lat, kr, lengths = _inputs(rng, B, S)
  f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
  s = (np.einsum("bhc,bsc->bhs", f64(q_lat), f64(lat))
       + np.einsum("bhr,bsr->bhs", f64(q_rope), f64(kr))) * scale
  s = np.where(np.arange(S)[None, None, :] < np.asarray(lengths)[:, None, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = np.einsum("bhs,bsc->bhc", p, f64(lat))
  got = np.asarray(mdk.reference(q_lat, q_rope, lat, kr, lengths, scale), np.float64)
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2  # P and o rounded to bf16


def test_splits_combine_to_the_whole_softmax(rng):
  """Flash-decoding's combine: each split's normalised output and log2-sum-exp2 over its
  slots (float64 here, -inf for a split past the row's last visible slot) give the
  attention over all visible slots."""
  B, S, scale, J = 4, 64 * 5, 0.3, 3
  q_lat, q_rope, lat, kr, lengths = _inputs(rng, B, S)
  lengths = lengths.at[1].set(int(rng.integers(1, 64)))  # splits 1 and 2 of row 1 see nothing
  f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
  s2 = (np.einsum("bhc,bsc->bhs", f64(q_lat), f64(lat))
        + np.einsum("bhr,bsr->bhs", f64(q_rope), f64(kr))) * scale * np.log2(np.e)
  per = -(-(S // mdk.SLOTS) // J) * mdk.SLOTS  # slots a split
  o_parts, lse_parts = np.zeros((B, J, H, C)), np.full((B, J, H), -np.inf)
  for j in range(J):
    mine = (np.arange(S) >= j * per) & (np.arange(S) < (j + 1) * per)
    mask = mine[None, :] & (np.arange(S)[None, :] < np.asarray(lengths)[:, None])  # [B, S]
    for b in range(B):
      if mask[b].any():
        lse_parts[b, j] = np.log2(np.exp2(s2[b][:, mask[b]]).sum(-1))
        p = np.exp2(s2[b][:, mask[b]] - lse_parts[b, j][:, None])
        o_parts[b, j] = p @ f64(lat)[b][mask[b]]
  got = np.asarray(mdk.combine_splits(jnp.asarray(o_parts, jnp.float32),
                                      jnp.asarray(lse_parts, jnp.float32), jnp.float32))
  want = np.asarray(mdk.reference(*[jnp.asarray(a, jnp.float32) for a in (q_lat, q_rope, lat, kr)],
                                  lengths, scale))
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("impl,B,splits,row_pad,early,ring", [
    ("wgmma", 3, 1, 8, True, None), ("wgmma", 3, 2, 8, True, 13), ("wgmma", 2, None, 8, True, 9),
    ("wgmma", 2, 1, 8, True, 20),
    ("mma", 3, 1, 8, True, None), ("mma", 3, 2, 0, False, None), ("mma", 2, None, 8, False, None)])
def test_kernel_in_the_gpu_interpreter_matches_reference(rng, impl, B, splits, row_pad, early,
                                                         ring):
  """Everything but the MMA instructions (the interpreter has none: dots there): the ring
  of TMA copies and its barriers, the steps a row and split walk, the masks of ragged
  lengths (one row shorter than a step), the online softmax (for wgmma along the columns
  of the transposed scores) and the splits' combine; for wgmma rings of boxes that hold
  one step, a step and a part, and more than two steps; for mma the padded boxes (each
  64-column chunk at its offset in its 72-column box) and unpadded, the copies issued at
  a step's start or after its scores."""
  S = 64 * 5
  args = _inputs(rng, B, S)
  args = (*args[:4], args[4].at[-1].set(int(rng.integers(1, 64))))
  got = mdk.mla_decode(*args, scale=0.3, splits=splits, interpret=True, row_pad=row_pad,
                       early_fetch=early, impl=impl, ring=ring)
  want = mdk.reference(*args, 0.3)
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2  # bf16 P and output


def test_kernel_lowers_for_cuda_and_refuses_other_shapes():
  B, S = 4, 128
  args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((B, H, C), (B, H, R), (B, S, C),
                                                          (B, S, R))]
  args.append(jax.ShapeDtypeStruct((B,), jnp.int32))
  for splits, impl in itertools.product((1, 2, None), mdk.IMPLS):  # one CTA a row; two
    text = jax.jit(lambda *a: mdk.mla_decode(  # (combined after); the default
        *a, scale=0.1, splits=splits, impl=impl)).trace(
        *args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
  for pdl in (False, True):   # PDL: the kernel module's attribute, the wait, the prefetches
    text = jax.jit(lambda *a, pdl=pdl: mdk.mla_decode(*a, scale=0.1, pdl=pdl)).trace(
        *args).lower(lowering_platforms=("cuda",)).as_text()
    assert all((k in text) == pdl for k in ("mosaic_gpu.uses_pdl", "griddepcontrol.wait",
                                            "cp.async.bulk.prefetch"))
  with pytest.raises(ValueError, match="pdl and _ablate apply to impl='wgmma' only"):
    mdk.mla_decode(*[jnp.zeros(a.shape, a.dtype) for a in args], scale=0.1, impl="mma",
                   pdl=True)
  assert mdk.default_splits(256, 576) == 1 and mdk.default_splits(32, 576) == 5
  assert mdk.default_splits(1, 128) == 2  # at most one a step of 64 slots
  with pytest.raises(ValueError, match="ring must hold a step.s 9 boxes"):
    mdk.mla_decode(*[jnp.zeros(a.shape, a.dtype) for a in args], scale=0.1, ring=8)
  with pytest.raises(ValueError, match="apply to impl='wgmma' only"):
    mdk.mla_decode(*[jnp.zeros(a.shape, a.dtype) for a in args], scale=0.1, impl="mma", ring=18)
  with pytest.raises(ValueError, match="impl must be one of"):
    mdk.mla_decode(*[jnp.zeros(a.shape, a.dtype) for a in args], scale=0.1, impl="wmma")
  with pytest.raises(ValueError, match="splits must be 1..2"):
    mdk.mla_decode(*[jnp.zeros(a.shape, a.dtype) for a in args], scale=0.1, splits=3)
  assert mdk.unsupported_reason(H, C, R, S, jnp.bfloat16) is None
  assert "heads must be 16" in mdk.unsupported_reason(32, C, R, S, jnp.bfloat16)
  assert "multiple of 64" in mdk.unsupported_reason(H, C, R, 100, jnp.bfloat16)
  assert "bfloat16" in mdk.unsupported_reason(H, C, R, S, jnp.float32)
  with pytest.raises(ValueError, match="cache slots must be a multiple of 64"):
    mdk.mla_decode(*[jnp.zeros(a.shape, a.dtype) for a in args[:2]],
                   jnp.zeros((B, 100, C), jnp.bfloat16), jnp.zeros((B, 100, R), jnp.bfloat16),
                   jnp.ones((B,), jnp.int32), scale=0.1)


@pytest.mark.gpu
@pytest.mark.skipif(pk.resolve_backend("auto") != "mosaic_gpu", reason="needs a Hopper GPU")
@pytest.mark.parametrize("impl,B,S,splits,row_pad,early,ring", [
    ("wgmma", 2, 64, None, 8, True, None), ("wgmma", 8, 576, None, 8, True, None),
    ("wgmma", 8, 576, 1, 8, True, None), ("wgmma", 8, 576, 4, 8, True, None),
    ("wgmma", 256, 576, None, 8, True, None), ("wgmma", 256, 640, 1, 8, True, None),
    ("wgmma", 8, 576, 2, 8, True, 13),
    ("mma", 2, 64, None, 8, True, None), ("mma", 8, 576, None, 8, True, None),
    ("mma", 8, 576, 1, 8, True, None), ("mma", 8, 576, 4, 8, True, None),
    ("mma", 256, 576, None, 8, True, None), ("mma", 8, 576, None, 0, False, None),
    ("mma", 8, 576, 2, 8, False, None)])
def test_kernel_matches_reference_on_the_gpu(rng, impl, B, S, splits, row_pad, early, ring):
  args = _inputs(rng, B, S)
  got = mdk.mla_decode(*args, scale=0.3, splits=splits, row_pad=row_pad, early_fetch=early,
                       impl=impl, ring=ring)
  want = jax.jit(mdk.reference, static_argnums=5)(*args, 0.3)
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert np.isfinite(got).all()
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-2


def test_model_decode_step_lowers_with_the_kernel(monkeypatch):
  """model.decode_attention=pallas: a MoHGE-3B-shaped decode step (2 layers) runs its
  attention through the kernel (the lowered program holds it; with xla it does not); auto
  takes it on a Hopper GPU (faked here) from batch 32 and not below, nor on this CPU; a
  cache whose length is not a multiple of 64 is refused by name."""
  from flax import nnx

  import pallas_kernels
  from benchmarks import decode
  from mohge_jax.config import load_config
  from mohge_jax.model import Transformer
  from mohge_jax.trainer import graph_def
  texts = {}
  P, N = 60, 4
  for how, B, hopper in (("xla", 32, True), ("pallas", 4, False), ("auto", 32, True),
                         ("auto", 31, True), ("auto", 32, False)):
    resolve = pallas_kernels.resolve_backend
    monkeypatch.setattr(pallas_kernels, "resolve_backend", lambda b="auto": (
        "mosaic_gpu" if hopper and b == "auto" else resolve(b)))
    cfg = load_config("configs/mohge_3b.yaml", ["model.num_layers=2",
                                                f"model.decode_attention={how}"])
    graphdef = graph_def(cfg)
    state = jax.eval_shape(lambda: jax.tree.map(lambda a: a.astype(jnp.bfloat16), nnx.state(
        Transformer(cfg, rngs=nnx.Rngs(0)))))
    prompts, lengths = (jax.ShapeDtypeStruct(s, jnp.int32) for s in ((B, P), (B,)))
    _, caches = jax.jit(decode.make_prefill(cfg, graphdef, P + N)).trace(
        state, prompts, lengths).out_info
    texts[how, B, hopper] = jax.jit(decode.make_decode(cfg, graphdef, N, "all_experts")).trace(
        state, None, lengths, lengths, caches).lower(lowering_platforms=("cuda",)).as_text()
    monkeypatch.setattr(pallas_kernels, "resolve_backend", resolve)
  kernel = {k: "mosaic_gpu" in t for k, t in texts.items()}
  assert kernel == {("xla", 32, True): False, ("pallas", 4, False): True,
                    ("auto", 32, True): True, ("auto", 31, True): False,
                    ("auto", 32, False): False}
  cfg = load_config("configs/mohge_3b.yaml", ["model.num_layers=2",
                                              "model.decode_attention=pallas"])
  graphdef = graph_def(cfg)
  _, caches = jax.jit(decode.make_prefill(cfg, graphdef, P + N + 1)).trace(
      state, prompts, lengths).out_info
  with pytest.raises(ValueError, match="multiple of 64 .* got 65"):
    jax.jit(decode.make_decode(cfg, graphdef, N, "all_experts")).trace(
        state, None, lengths, lengths, caches)


@pytest.mark.gpu
@pytest.mark.skipif(pk.resolve_backend("auto") != "mosaic_gpu", reason="needs a Hopper GPU")
@pytest.mark.parametrize("B,S,splits", [(256, 576, None), (8, 576, 4)])
def test_kernel_with_pdl_on_the_gpu(rng, B, S, splits):
  """pdl=True (programmatic dependent launch): the queries and the cache made by XLA
  kernels just before the kernel in the same program (the queries doubled, the cache
  halved: exact, the scores unchanged), as at decode (the query's products, the cache
  writes), so a read before the wait would see them unfinished; against the reference of
  the scaled inputs."""
  args = _inputs(rng, B, S)
  times = lambda a, f: (a.astype(jnp.float32) * f).astype(a.dtype)  # noqa: E731 - exact
  scaled = lambda q, qr, lat, kr: (times(q, 2), times(qr, 2), times(lat, 0.5),  # noqa: E731
                                   times(kr, 0.5))
  got = jax.jit(lambda q, qr, lat, kr, n: mdk.mla_decode(
      *scaled(q, qr, lat, kr), n, scale=0.3, splits=splits, pdl=True))(*args)
  want = jax.jit(mdk.reference, static_argnums=5)(*scaled(*args[:4]), args[4], 0.3)
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert np.isfinite(got).all()
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-2
