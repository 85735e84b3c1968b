"""pallas_kernels/sparse_mla_mma_gpu.py, the DSA kernels on the 16-row MMA (forward, the
probabilities form, the backward): in the GPU interpreter (the MMAs as dots) against the
pure-JAX reference and float64, their CUDA lowering at MoHGE-3B's shapes, their refusals; on
a Hopper GPU against the reference (skipped without one)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from mohge_jax import sparse_attention as dsa
from pallas_kernels import sparse_mla_mma_gpu as k3
from test_sparse_attention import _kernel_problem

H = 16


def _problem(rng, B, T, C, R, K):
  return _kernel_problem(rng, jnp.bfloat16, B, T, H, C, R, K)


def _lse64(q_lat, q_rope, c, kr, idx, valid, scale):
  """The log-sum-exp of each query's scaled scores over its valid keys (float64; invalid
  keys at -1e30, as the kernel)."""
  f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
  ql, qr, c, kr, idx, valid = (f64(q_lat), f64(q_rope), f64(c), f64(kr), np.asarray(idx),
                               np.asarray(valid))
  b = np.arange(idx.shape[0])[:, None, None]
  s = (np.einsum("bthc,btkc->bthk", ql, c[b, idx]) +
       np.einsum("bthr,btkr->bthk", qr, kr[b, idx])) * scale
  s = np.where(valid[:, :, None, :], s, -1e30)
  top = s.max(-1, keepdims=True)
  return top[..., 0] + np.log(np.exp(s - top).sum(-1))


@pytest.mark.parametrize("C,R,K", [(128, 64, 130), (256, 128, 64)])
def test_interpreted_equals_reference(rng, C, R, K):
  """o_lat against impl="reference" (float32 on the same bf16 inputs) and the LSE against
  float64, over several 64-key steps (the online softmax, the padding of K), two batch
  rows (the gather's row offset), rope 64 (the tail's last half) and 128 (all of it); the
  interpreter's race detector finds no race around the idx row's copy."""
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
  from jax.experimental.pallas import mosaic_gpu as plgpu

  args, idx, valid = _problem(rng, 2, 5, C, R, K)
  q_lat, q_rope, c, kr = args
  o, lse = k3.sparse_mla_fwd(q_lat, q_rope, jnp.concatenate([c, kr], -1),
                             jnp.where(valid, idx, -1), scale=0.1,
                             interpret=plgpu.InterpretGPUParams(detect_races=True))
  assert not gpu_callbacks.get_races().races_found
  f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
  o_r, _ = dsa.sparse_mla(*map(f32, args), idx, valid, scale=0.1, chunk=4)
  o, o_r = np.asarray(o, np.float32), np.asarray(o_r)
  assert np.isfinite(o).all()
  assert np.linalg.norm(o - o_r) / np.linalg.norm(o_r) < 1e-2  # P and o in bf16
  np.testing.assert_allclose(np.asarray(lse), _lse64(*args, idx, valid, 0.1), atol=1e-4)


def test_probabilities_form_interpreted_equals_float64(rng):
  """The KL target (P summed over heads / H, from the forward's LSE) in the GPU interpreter
  against float64, both forms: sparse_mla_probs (a second pass over the keys) and
  probs_from_steps (the forward's step_probs outputs; bf16 P: within 2^-8). K = 130 (three
  steps, the last padded), invalid keys 0, a query with no valid key all 0; rows sum to 1
  where any key is valid. The forward's o and LSE with step_probs against float64 too."""
  args, idx, valid = _problem(rng, 1, 5, 128, 64, 130)
  valid = valid.at[0, 2].set(False)
  q_lat, q_rope, c, kr = args
  ckr, idx_enc = jnp.concatenate([c, kr], -1), jnp.where(valid, idx, -1)
  o, lse, p_steps, m_steps = k3.sparse_mla_fwd(q_lat, q_rope, ckr, idx_enc, scale=0.1,
                                               interpret=True, step_probs=True)
  assert p_steps.shape == (1, 5, 3, H, 64) and m_steps.shape == (1, 5, 3, H)
  f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
  v = np.asarray(valid)
  s = (np.einsum("bthc,btkc->bthk", f64(q_lat), f64(c)[0, idx]) +
       np.einsum("bthr,btkr->bthk", f64(q_rope), f64(kr)[0, idx])) * 0.1
  s = np.where(v[:, :, None], s, -np.inf)
  rows = v.any(-1)
  with np.errstate(divide="ignore", invalid="ignore"):  # the query with no valid key
    lse_want = np.log(np.exp(s).sum(-1))
    o_want = np.einsum("bthk,btkc->bthc", np.exp(s - lse_want[..., None]), f64(c)[0, idx])
  np.testing.assert_allclose(np.asarray(lse)[rows], lse_want[rows], rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(np.asarray(o, np.float32)[rows], o_want[rows], rtol=2e-2,
                             atol=2e-2 * np.abs(o_want[rows]).max())
  for form, rtol in (("kernel", 1e-4), ("steps", 2.0 ** -8)):
    lse_f = lse.at[0, 2].set(0.0) if form == "kernel" else lse  # a query with no valid key
    p = np.asarray(k3.sparse_mla_probs(q_lat, q_rope, ckr, idx_enc, lse_f, scale=0.1,
                                       interpret=True) if form == "kernel"
                   else k3.probs_from_steps(p_steps, m_steps, lse, idx_enc))
    with np.errstate(over="ignore"):  # the query with no valid key: masked below
      want = np.where(v, np.exp(s - f64(lse_f)[..., None]).sum(2) / H, 0.0)
    assert p.shape == (1, 5, 130), form
    np.testing.assert_allclose(p, want, rtol=rtol, atol=1e-6, err_msg=form)
    assert (p[0, 2] == 0).all(), form  # gets zeros whatever its LSE
    np.testing.assert_allclose(p.sum(-1)[rows], 1.0, rtol=rtol, err_msg=form)


@pytest.mark.parametrize("C,R,K,reduce", [(128, 64, 70, "tma"), (256, 128, 32, "tma"),
                                          (128, 64, 70, "atomic")])
def test_backward_interpreted_equals_reference(rng, C, R, K, reduce):
  """sparse_mla_bwd in the GPU interpreter (MMAs as dots, each key's row added by a load
  and store where the GPU uses a TMA reduce-add or atomics) against the pure-JAX backward
  in float32 from the same o and LSE: dq_lat, dq_rope and dckr, with keys chosen by several
  queries (their rows' gradients add up), invalid keys, the idx row padded (K = 70: three
  32-key steps), both rope widths and (reduce="atomic") the rows staged padded to 256."""
  args, idx, valid = _problem(rng, 2, 5, C, R, K)
  q_lat, q_rope, c, kr = args
  ckr, idx_enc = jnp.concatenate([c, kr], -1), jnp.where(valid, idx, -1)
  o, lse = k3.sparse_mla_fwd(q_lat, q_rope, ckr, idx_enc, scale=0.1, interpret=True)
  g = jnp.asarray(rng.normal(size=q_lat.shape), jnp.bfloat16)
  delta = jnp.sum(g.astype(jnp.float32) * o.astype(jnp.float32), -1)
  got = k3.sparse_mla_bwd(q_lat, q_rope, ckr, idx_enc, lse, g, delta, scale=0.1,
                          interpret=True, reduce=reduce)
  f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
  want = dsa._sparse_mla_bwd(f32(q_lat), f32(q_rope), f32(ckr), idx, valid, f32(o), lse,
                             f32(g), scale=0.1, chunk=4)
  assert [a.dtype for a in got] == [jnp.bfloat16, jnp.bfloat16, jnp.float32]
  for a, b in zip(got, want):
    a, b = np.asarray(a, np.float32), np.asarray(b)
    assert a.shape == b.shape and np.isfinite(a).all()
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-2  # ds and p in bf16
  used = np.zeros(ckr.shape[:2], bool)
  for bb in range(2):
    used[bb, np.asarray(idx[bb])[np.asarray(valid[bb])]] = True
  assert (np.asarray(got[2])[~used] == 0).all()  # rows no query chose get nothing


def test_selected_through_dsa_impl():
  """dsa_impl=pallas_mma / interpret_mma reach this kernel (its gradients through
  sparse_mla are tested beside the wgmma kernel's:
  test_sparse_attention.py::test_sparse_mla_kernel_interpreted_equals_reference) and
  refuse what it cannot take."""
  assert dsa.resolve_sparse_mla_impl("pallas_mma", 16, 512, 64, 2048, jnp.bfloat16) == "pallas_mma"
  with pytest.raises(ValueError, match="heads must be 16"):
    dsa.resolve_sparse_mla_impl("pallas_mma", 8, 512, 64, 2048, jnp.bfloat16)
  with pytest.raises(ValueError, match="dtype must be bfloat16"):
    dsa.resolve_sparse_mla_impl("interpret_mma", 16, 512, 64, 2048, jnp.float32)
  from mohge_jax.config import ConfigError, load_config
  load_config("configs/mohge_3b_dsa.yaml", ["model.dsa_impl=pallas_mma"])  # its shapes: taken
  with pytest.raises(ConfigError, match=r"model.dsa_impl=pallas_mma: .*heads must be 16 .*got 8"):
    load_config("configs/mohge_3b_dsa.yaml", ["model.dsa_impl=pallas_mma", "model.num_heads=8"])


def test_lowers_for_cuda_at_mohge_3b_shapes_and_refuses_others():
  """Mosaic GPU lowering (no GPU; checks the SMEM budget) at H = 16, C = 512, R = 64,
  K = 2048, T = 128k (the model's use, with gradients: the 64k training step below);
  shapes it cannot take are refused by name."""
  sds, bf = jax.ShapeDtypeStruct, jnp.bfloat16
  T, C, R, K = 131072, 512, 64, 2048
  for step_probs in (False, True):
    text = jax.jit(lambda *a: k3.sparse_mla_fwd(*a, scale=0.04, step_probs=step_probs)).trace(
        sds((1, T, H, C), bf), sds((1, T, H, R), bf), sds((1, T, C + R), bf),
        sds((1, T, K), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text, step_probs
  assert k3.unsupported_reason(H, C, R, K, bf) is None
  assert "heads must be 16" in k3.unsupported_reason(32, C, R, K, bf)
  assert "latent dim" in k3.unsupported_reason(H, 384, R, K, bf)
  assert "rope dim" in k3.unsupported_reason(H, C, 32, K, bf)
  assert "bfloat16" in k3.unsupported_reason(H, C, R, K, jnp.float32)
  assert "selected keys" in k3.unsupported_reason(H, C, R, 64 * 257, bf)
  for reduce in ("atomic", "tma"):  # the backward at 64k, both ways of adding
    text = jax.jit(lambda *a: k3.sparse_mla_bwd(*a, scale=0.04, reduce=reduce)).trace(
        sds((1, T // 2, H, C), bf), sds((1, T // 2, H, R), bf), sds((1, T // 2, C + R), bf),
        sds((1, T // 2, K), jnp.int32), sds((1, T // 2, H), jnp.float32),
        sds((1, T // 2, H, C), bf), sds((1, T // 2, H), jnp.float32)).lower(
            lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text, reduce
  z = jnp.zeros
  with pytest.raises(ValueError, match=r"ckr must be \[B, S, C\+R\]"):
    k3.sparse_mla_fwd(z((1, 2, H, C), bf), z((1, 2, H, R), bf), z((1, 2, C), bf),
                      z((1, 2, K), jnp.int32), scale=0.1)


@pytest.mark.gpu
@pytest.mark.skipif(pk.resolve_backend("auto") != "mosaic_gpu", reason="needs a Hopper GPU")
@pytest.mark.parametrize("T,K", [(1000, 256), (4096, 2048)])
def test_equals_reference_on_the_gpu(rng, T, K):
  """The forward kernel (with step_probs: the same o and LSE, and the KL target from its
  steps) against the pure-JAX reference in float32; the two forms of the target against
  the reference's p."""
  args, idx, valid = _problem(rng, 1, T, 512, 64, K)
  q_lat, q_rope, c, kr = args
  ckr, idx_enc = jnp.concatenate([c, kr], -1), jnp.where(valid, idx, -1)
  o, lse = k3.sparse_mla_fwd(q_lat, q_rope, ckr, idx_enc, scale=0.04)
  o2, lse2, p_steps, m_steps = k3.sparse_mla_fwd(q_lat, q_rope, ckr, idx_enc, scale=0.04,
                                                 step_probs=True)
  f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
  o_r, p_r = jax.jit(lambda *a: dsa.sparse_mla(*a, idx, valid, scale=0.04, chunk=256))(
      *map(f32, args))
  o, o_r, p_r = np.asarray(o, np.float32), np.asarray(o_r), np.asarray(p_r)
  assert np.isfinite(o).all() and np.isfinite(np.asarray(lse)).all()
  assert np.linalg.norm(o - o_r) / np.linalg.norm(o_r) < 2e-2
  np.testing.assert_array_equal(np.asarray(o2, np.float32), o)
  np.testing.assert_array_equal(np.asarray(lse2), np.asarray(lse))
  for p in (k3.sparse_mla_probs(q_lat, q_rope, ckr, idx_enc, lse, scale=0.04),
            k3.probs_from_steps(p_steps, m_steps, lse, idx_enc)):
    p = np.asarray(p)
    assert np.linalg.norm(p - p_r) / np.linalg.norm(p_r) < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(pk.resolve_backend("auto") != "mosaic_gpu", reason="needs a Hopper GPU")
@pytest.mark.parametrize("T,K,reduce,ordered", [(1000, 256, "tma", False),
                                                (4096, 2048, "tma", False),
                                                (1000, 256, "atomic", False),
                                                (4096, 2048, "atomic", False),
                                                (4096, 2048, "atomic", True)])
def test_backward_equals_reference_on_the_gpu(rng, T, K, reduce, ordered):
  """The backward kernel (its MMAs, and its TMA reduce-adds or atomics, which the
  interpreter has not; with each query's keys in random order or (ordered) in rising
  position order, as the threshold and fused top-k give them) against the pure-JAX
  backward in float32 from the same o and LSE."""
  args, idx, valid = _problem(rng, 1, T, 512, 64, K)
  if ordered:
    idx = jnp.sort(idx, axis=-1)
    valid = idx <= jnp.arange(T)[None, :, None]
  q_lat, q_rope, c, kr = args
  ckr, idx_enc = jnp.concatenate([c, kr], -1), jnp.where(valid, idx, -1)
  o, lse = k3.sparse_mla_fwd(q_lat, q_rope, ckr, idx_enc, scale=0.04)
  g = jnp.asarray(rng.normal(size=q_lat.shape), jnp.bfloat16)
  delta = jnp.sum(g.astype(jnp.float32) * o.astype(jnp.float32), -1)
  got = k3.sparse_mla_bwd(q_lat, q_rope, ckr, idx_enc, lse, g, delta, scale=0.04,
                          reduce=reduce)
  f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
  want = jax.jit(lambda *a: dsa._sparse_mla_bwd(*a, scale=0.04, chunk=256))(
      f32(q_lat), f32(q_rope), f32(ckr), idx, valid, f32(o), lse, f32(g))
  for a, b in zip(got, want):
    a, b = np.asarray(a, np.float32), np.asarray(b)
    assert np.isfinite(a).all()
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 2e-2


def _lowered_3b_dsa_step(T: int, devices: int, overrides: list[str]) -> str:
  """configs/mohge_3b_dsa.yaml's training step (2 of its layers, one T-token row a device,
  the batch over `devices` CPU devices as data), lowered for CUDA: its module text."""
  from mohge_jax import sharding
  from mohge_jax.config import load_config
  from mohge_jax.trainer import abstract_state, graph_def, make_train_step

  cfg = load_config("configs/mohge_3b_dsa.yaml", [
      f"train.batch_size={devices}", f"train.seq_len={T}", "train.grad_accum=1",
      "model.num_layers=2", "model.attention_impl=xla", *overrides])
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:devices])
  assert dict(mesh.shape)["data"] == devices
  with jax.set_mesh(mesh):
    state = abstract_state(cfg, mesh)
    bs = sharding.batch_sharding(mesh, leading=1)
    batch = {k: jax.ShapeDtypeStruct((1, devices, T), dt, sharding=bs) for k, dt in (
        ("inputs", jnp.int32), ("targets", jnp.int32), ("loss_mask", jnp.float32),
        ("segment_ids", jnp.int32), ("positions", jnp.int32))}
    return make_train_step(cfg, graph_def(cfg)).trace(state, batch).lower(
        lowering_platforms=("cuda",)).as_text()


def test_mohge_3b_dsa_training_step_lowers_at_64k(monkeypatch):
  """configs/mohge_3b_dsa.yaml's training step (2 of its layers) at one 64k-token sequence
  with dsa_impl=pallas_mma(_bwd) and the config's fused top-k (the sampled one for the
  others), the expert and indexer kernels forced (this host is a CPU): traces and lowers
  for CUDA, as issue 16's 64k step will run on the H200."""
  import pallas_kernels
  from jax._src.pallas.triton import gpu_info, pallas_call_registration as reg
  from mohge_jax import dispatch
  from pallas_kernels import gpu

  monkeypatch.setattr(pallas_kernels, "get_ops", lambda *a, **k: gpu.GpuOps(num_sms=132, **k))
  resolve = dispatch.resolve_backend
  monkeypatch.setattr(dispatch, "resolve_backend",
                      lambda b, *a: "pallas" if b == "auto" else resolve(b, *a))
  monkeypatch.setattr(dsa, "_indexer_backend", lambda: "kernel")
  info = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion("NVIDIA H100"))
  monkeypatch.setattr(reg.gpu_info_lib, "get_gpu_info", lambda: info)  # Triton's lowering
  T = 65536
  texts = {}

  def kernels(impl):  # Mosaic GPU calls in the lowered step
    method = "fused" if impl == "pallas_mma_bwd" else "sample"
    texts[impl] = _lowered_3b_dsa_step(T, 1, [f"model.dsa_impl={impl}",
                                              f"model.dsa_topk_method={method}"])
    return texts[impl].count("@mosaic_gpu")

  assert kernels("pallas_mma_bwd") > kernels("pallas_mma") > kernels("reference") > 0
  for name in ("dsa_index_count", "dsa_index_candidates", "dsa_kth_rows", "dsa_topk_rows"):
    assert name in texts["pallas_mma_bwd"] and name not in texts["pallas_mma"], name


def test_dsa_training_step_on_two_devices_lowers_the_kernels_per_shard(monkeypatch):
  """The 3B DSA config's training step (2 layers, 16k tokens, batch 2) on a mesh of two
  devices that split the batch, on a faked Hopper GPU: with dsa_impl=auto the DSA kernels
  (the sparse attention's Mosaic GPU calls, the fused top-k's Triton ones) are in the
  lowered step (inside `sparse_stage`'s shard_map), where before they were left out under
  a mesh of several devices; dsa_impl=reference has none of them."""
  import pallas_kernels
  from jax._src.pallas.triton import gpu_info, pallas_call_registration as reg

  monkeypatch.setattr(pallas_kernels, "resolve_backend", lambda *a, **k: "mosaic_gpu")
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # the fused top-k's "auto"
  info = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion("NVIDIA H100"))
  monkeypatch.setattr(reg.gpu_info_lib, "get_gpu_info", lambda: info)  # Triton's lowering
  T = 16384

  auto, ref = (_lowered_3b_dsa_step(T, 2, [f"model.dsa_impl={impl}",
                                           "model.expert_backend=ragged_dot"])
               for impl in ("auto", "reference"))
  assert auto.count("@mosaic_gpu") > 0 and ref.count("@mosaic_gpu") == 0
  for name in ("dsa_topk_rows", "dsa_selected_scores_bwd"):  # (at 16k every key of a row
    assert name in auto, name                                  # is a candidate: no compaction)
