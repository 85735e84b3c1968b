"""ragged_all_to_all / exchange_sizes against a numpy model of jax.lax.ragged_all_to_all.

The multi-device checks need several devices (4 fake CPU devices, which must be set before
jax starts), so they run in a subprocess (SCRIPT below) with a seed from the `rng` fixture.
On CPU they run the emulation (XLA:CPU cannot compile the real op), forward and gradients;
`test_real_ragged_all_to_all_on_gpus` runs the same checks through the real
`jax.lax.ragged_all_to_all` on 2+ GPUs (marked gpu, skipped here).
"""

import os
import subprocess
import sys

import pytest

from conftest import xla_flags
from mohge_jax import collectives

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r'''
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P
from mohge_jax import collectives
from mohge_jax.collectives import exchange_sizes, ragged_all_to_all

# argv: checks (comma-separated), seed, number of devices R, impl of ragged_all_to_all
# ("emulated" on CPU; "lax" = the real jax.lax.ragged_all_to_all, on GPUs).
R = int(sys.argv[3]) if len(sys.argv) > 3 else 4
IMPL = sys.argv[4] if len(sys.argv) > 4 else "emulated"
jax.config.update("jax_default_matmul_precision", "highest")  # float32 matmuls on GPU too
rng = np.random.default_rng(int(sys.argv[2]))
mesh = jax.make_mesh((R,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
                     devices=jax.devices()[:R])
smap = lambda f: jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("x"), out_specs=P("x")))


def random_sizes(S, everything_to=None):
  """n[s, i]: rows source s sends as slice i (to rank i // S); ~1/3 zeros."""
  n = rng.integers(0, 5, (R, R * S)) * (rng.random((R, R * S)) > 0.33)
  if everything_to is not None:
    n[:, np.arange(R * S) // S != everything_to] = 0
  return n


def np_exchange(n, S):
  """recv[j, s*S+k] = n[s, j*S+k]; slices packed at j in (source, slice) order."""
  recv, oo = np.zeros_like(n), np.zeros_like(n)
  for j in range(R):
    pos = 0
    for s in range(R):
      for k in range(S):
        recv[j, s * S + k] = n[s, j * S + k]
        oo[s, j * S + k] = pos
        pos += n[s, j * S + k]
  return recv, oo


def random_layout(n, S):
  """Input offsets (slices shuffled, with gaps) and output offsets (random base, gaps)."""
  io, oo = np.zeros_like(n), np.zeros_like(n)
  C = 0
  for s in range(R):
    pos = rng.integers(0, 3)
    for i in rng.permutation(R * S):
      io[s, i] = pos
      pos += n[s, i] + rng.integers(0, 2)
    C = max(C, pos)
  M = 0
  for j in range(R):
    pos = rng.integers(0, 3)
    for s in range(R):
      for k in range(S):
        oo[s, j * S + k] = pos
        pos += n[s, j * S + k] + rng.integers(0, 2)
    M = max(M, pos + rng.integers(1, 4))
  return io, oo, int(C) + 1, int(M)


def np_ragged(op, out, io, n, oo, S):
  """The documented semantics: slice i of source s is written at oo[s, i] on rank i // S."""
  res = out.copy()
  for s in range(R):
    for i in range(R * S):
      j = i // S
      res[j, oo[s, i]:oo[s, i] + n[s, i]] = op[s, io[s, i]:io[s, i] + n[s, i]]
  return res


def np_ragged_grad(w, io, n, oo, C, S):
  """Transpose: cotangent rows go back to the sent rows; written output rows get zero."""
  d_op = np.zeros((R, C) + w.shape[2:], w.dtype)
  d_out = w.copy()
  for s in range(R):
    for i in range(R * S):
      j = i // S
      d_op[s, io[s, i]:io[s, i] + n[s, i]] += w[j, oo[s, i]:oo[s, i] + n[s, i]]
  for s in range(R):
    for i in range(R * S):
      d_out[i // S, oo[s, i]:oo[s, i] + n[s, i]] = 0
  return d_op, d_out


def flat(a):
  return jnp.asarray(a.reshape(-1, *a.shape[2:]))


def run_ragged(op, out, io, n, oo, recv, impl):
  f = smap(lambda *a: ragged_all_to_all(*a, axis_name="x", impl=impl))
  return np.asarray(f(*map(flat, (op, out, io, n, oo, recv)))).reshape(out.shape)


def cases():
  for S in (1, 2):
    for dst in (None, int(rng.integers(R))):
      yield S, random_sizes(S, dst)


def check_exchange():
  for S, n in cases():
    recv, oo = smap(lambda a: exchange_sizes(a, axis_name="x"))(flat(n.astype(np.int32)))
    want_recv, want_oo = np_exchange(n, S)
    assert np.array_equal(np.asarray(recv).reshape(R, -1), want_recv), (n, recv)
    assert np.array_equal(np.asarray(oo).reshape(R, -1), want_oo), (n, oo)


def check_forward():
  for S, n in cases():
    recv, _ = np_exchange(n, S)
    io, oo, C, M = random_layout(n, S)
    for dtype, feat, impl in ((np.float32, (3, 2), IMPL), (np.int32, (), IMPL),
                              (np.float32, (), "auto")):
      op = rng.integers(-1000, 1000, (R, C) + feat).astype(dtype)
      if dtype == np.float32:
        op = op * np.float32(np.pi)  # not exactly representable: bitwise check is meaningful
      out = rng.integers(-1000, 1000, (R, M) + feat).astype(dtype)
      want = np_ragged(op, out, io, n, oo, S)
      got = run_ragged(op, out, io, n, oo, recv, impl)
      assert got.dtype == dtype and np.array_equal(got, want), (impl, S, n, got, want)


def check_packed():
  """Offsets from exchange_sizes inside the shard_map; rows past the received ones survive."""
  def f(op, send):
    recv, oo = exchange_sizes(send, axis_name="x")
    io = jnp.cumsum(send) - send
    out = jnp.full((R * C, 5), -1.0, op.dtype)
    return ragged_all_to_all(op, out, io, send, oo, recv, axis_name="x", impl=IMPL)
  for S, n in cases():
    if S != 1:
      continue
    C = int(n.sum(1).max())
    io = np.cumsum(n, 1) - n
    recv, oo = np_exchange(n, 1)
    op = rng.standard_normal((R, C, 5)).astype(np.float32)
    want = np_ragged(op, np.full((R, R * C, 5), -1.0, np.float32), io, n, oo, 1)
    got = smap(f)(flat(op), flat(n.astype(np.int32)))
    assert np.array_equal(np.asarray(got).reshape(want.shape), want)


def check_tuple_axes():
  """axis_name=("a", "b") over a 2x2 mesh acts as one axis of 4 ranks, row-major."""
  mesh2 = jax.make_mesh((2, 2), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  f = jax.jit(jax.shard_map(lambda *a: ragged_all_to_all(*a, axis_name=("a", "b")),
                            mesh=mesh2, in_specs=P(("a", "b")), out_specs=P(("a", "b"))))
  n = random_sizes(1)
  recv, _ = np_exchange(n, 1)
  io, oo, C, M = random_layout(n, 1)
  op = rng.standard_normal((R, C)).astype(np.float32)
  out = rng.standard_normal((R, M)).astype(np.float32)
  got = np.asarray(f(*map(flat, (op, out, io, n, oo, recv)))).reshape(out.shape)
  assert np.array_equal(got, np_ragged(op, out, io, n, oo, 1))


def grad_case(S, n):
  """A random layout for sizes n: operand, output, output cotangent w, the four size and
  offset arrays (flat), and numpy's transpose (d_operand, d_output)."""
  recv, _ = np_exchange(n, S)
  io, oo, C, M = random_layout(n, S)
  op = rng.standard_normal((R, C, 3)).astype(np.float32)
  out = rng.standard_normal((R, M, 3)).astype(np.float32)
  w = rng.standard_normal((R, M, 3)).astype(np.float32)
  sizes = tuple(map(flat, (io, n, oo, recv)))
  want = np_ragged(op, out, io, n, oo, S), *np_ragged_grad(w, io, n, oo, C, S)
  return op, out, w, sizes, want


def check_grad():
  """jax.grad and jax.vjp of ragged_all_to_all (impl IMPL) against the hand-derived
  transpose (numpy), and against the emulation's vjp."""
  for S, n in cases():
    op, out, w, sizes, (want_y, want_op, want_out) = grad_case(S, n)

    def ragged(impl):
      return jax.shard_map(lambda *a: ragged_all_to_all(*a, axis_name="x", impl=impl),
                           mesh=mesh, in_specs=P("x"), out_specs=P("x"))

    def grads(f):
      loss = lambda op_, out_: jnp.sum(f(op_, out_, *sizes) * flat(w))
      d_op, d_out = jax.jit(jax.grad(loss, (0, 1)))(flat(op), flat(out))
      return np.asarray(d_op).reshape(want_op.shape), np.asarray(d_out).reshape(want_out.shape)

    d_op, d_out = grads(ragged(IMPL))
    assert np.array_equal(d_op, want_op), (S, n, d_op, want_op)
    assert np.array_equal(d_out, want_out), (S, n, d_out, want_out)
    if IMPL == "lax":  # how jax's own transpose rule does on this device (not asserted)
      d_op, d_out = grads(ragged("lax_autodiff"))
      print(f"lax_autodiff S={S}: operand grad exact {np.array_equal(d_op, want_op)}, "
            f"output grad exact {np.array_equal(d_out, want_out)}")
    # jax.vjp: the primal output and the pullback of a cotangent, against the emulation.
    vjps = {}
    for impl in (IMPL, "emulated"):
      y, pullback = jax.vjp(jax.jit(lambda a, b, impl=impl: ragged(impl)(a, b, *sizes)),
                            flat(op), flat(out))
      vjps[impl] = (y, *jax.jit(pullback)(flat(w)))
    assert np.array_equal(np.asarray(vjps[IMPL][0]).reshape(out.shape), want_y), (S, n)
    for a, b in zip(vjps[IMPL], vjps["emulated"]):
      assert np.array_equal(np.asarray(a), np.asarray(b)), (S, n)
    assert np.array_equal(np.asarray(vjps[IMPL][1]).reshape(want_op.shape), want_op)


def check_reverse_vjp():
  """with_reverse_vjp (the backward used with the real op) with the emulation as its
  exchange, so it runs on CPU: gradients equal the hand-derived transpose, values the
  documented semantics; the written-rows mask counts empty and abutting slices right."""
  def ragged(*a):
    return collectives.with_reverse_vjp(collectives._ragged_all_to_all_emulated, *a,
                                        axis_name="x")
  f = jax.shard_map(ragged, mesh=mesh, in_specs=P("x"), out_specs=P("x"))
  for S, n in cases():
    op, out, w, sizes, (want_y, want_op, want_out) = grad_case(S, n)
    y = jax.jit(f)(flat(op), flat(out), *sizes)
    assert np.array_equal(np.asarray(y).reshape(out.shape), want_y)
    loss = lambda a, b: jnp.sum(f(a, b, *sizes) * flat(w))
    d_op, d_out = jax.jit(jax.grad(loss, (0, 1)))(flat(op), flat(out))
    assert np.array_equal(np.asarray(d_op).reshape(want_op.shape), want_op), (S, n)
    assert np.array_equal(np.asarray(d_out).reshape(want_out.shape), want_out), (S, n)
  # Packed slices (abutting, some empty, some at the same offset as an empty one).
  offsets, sizes = np.array([0, 3, 3, 5, 5, 9]), np.array([3, 0, 2, 0, 4, 0])
  got = np.asarray(collectives.written_rows(jnp.asarray(offsets), jnp.asarray(sizes), 11))
  want = np.zeros(11, bool)
  for o, k in zip(offsets, sizes):
    want[o:o + k] = True
  assert np.array_equal(got, want), (got, want)


def check_expert_parallel():
  """The expert-parallel layer's all_to_all exchange (two ragged_all_to_alls, impl IMPL):
  forward and gradients (tokens, combine weights, expert weights) equal the single-device
  dispatch (no collective)."""
  from mohge_jax import expert_parallel, sharding
  from mohge_jax.config import MeshConfig
  from mohge_jax.dispatch import dispatch_and_combine
  G, N, K, D, T = 2, R, 3, 8, 6 * R
  ep_mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, expert=R, tensor=1),
                               jax.devices()[:R])
  x = jnp.asarray(rng.standard_normal((T, D)), jnp.float32)
  ids = jnp.asarray(np.stack([rng.choice(G * N, K, replace=False) for _ in range(T)]),
                    jnp.int32)
  wts = jnp.asarray(rng.random((T, K)), jnp.float32)
  wgu = [jnp.asarray(rng.standard_normal((N, D, 2 * w)) / 3, jnp.float32) for w in (4, 8)]
  wd = [jnp.asarray(rng.standard_normal((N, w, D)) / 3, jnp.float32) for w in (4, 8)]
  ct = jnp.asarray(rng.standard_normal((T, D)), jnp.float32)

  def parallel(x, wts, wgu, wd):
    return expert_parallel.routed_experts(x, ids, wts, wgu, wd, mesh=ep_mesh,
                                          experts_per_group=N, comm="all_to_all",
                                          backend="reference", a2a_impl=IMPL)

  def single(x, wts, wgu, wd):
    return dispatch_and_combine(x, ids, wts, wgu, wd, G * N, backend="reference")

  # Forward and backward in one jit, as the training step. (`jax.jit(pullback)` after
  # `jax.vjp(jax.jit(fn))` gets custom VJPs under shard_map wrong in jax 0.11.2: see
  # expert_parallel's note on permute_rows.)
  results = [jax.jit(lambda *a: (lambda y, pb: (y, pb(ct)))(*jax.vjp(fn, *a)))(x, wts, wgu, wd)
             for fn in (parallel, single)]
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(results[0][1][0]).max()) > 0  # gradients flowed back to the tokens


def check_lax_traces():
  """impl=lax (the real op, which XLA:CPU cannot compile) traces forward and backward,
  types included (a custom VJP's cotangents must vary over its inputs' mesh axes), on its
  own and in the expert-parallel layer, with invariant and varying output buffers."""
  z, i = jnp.zeros((R * 3, 2)), jnp.zeros((R * R,), jnp.int32)

  def bare(op, out, *sizes, fresh):
    buf = jnp.zeros((3, 2)) if fresh else out  # invariant (as the layer's) or varying
    return ragged_all_to_all(op, buf, *sizes, axis_name="x", impl="lax")
  for fresh in (False, True):
    f = jax.shard_map(lambda *a: bare(*a, fresh=fresh), mesh=mesh, in_specs=P("x"),
                      out_specs=P("x"))
    jax.make_jaxpr(jax.grad(lambda a, b: jnp.sum(f(a, b, i, i, i, i)), (0, 1)))(z, z)
  from mohge_jax import expert_parallel, sharding
  from mohge_jax.config import MeshConfig
  ep_mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, expert=R, tensor=1),
                               jax.devices()[:R])
  T, D, K = 4 * R, 8, 2
  wgu = [jnp.zeros((R, D, 2 * w)) for w in (4, 8)]
  wd = [jnp.zeros((R, w, D)) for w in (4, 8)]
  ids = jnp.zeros((T, K), jnp.int32)

  def layer(x, w, wgu, wd):
    return jnp.sum(expert_parallel.routed_experts(
        x, ids, w, wgu, wd, mesh=ep_mesh, experts_per_group=R, comm="all_to_all",
        backend="reference", a2a_impl="lax"))
  text = str(jax.make_jaxpr(jax.grad(layer, (0, 1, 2, 3)))(
      jnp.zeros((T, D)), jnp.zeros((T, K)), wgu, wd))
  assert text.count("ragged_all_to_all") >= 4, text  # two exchanges, two reverse ones


def check_impl():
  """auto traces the emulation on CPU (no ragged-all-to-all op); lax keeps the primitive."""
  z, i = jnp.zeros((R * 3, 2)), jnp.zeros((R * R,), jnp.int32)
  for impl, has in (("auto", False), ("emulated", False), ("lax", True)):
    f = jax.shard_map(lambda *a: ragged_all_to_all(*a, axis_name="x", impl=impl), mesh=mesh,
                      in_specs=P("x"), out_specs=P("x"))
    text = str(jax.make_jaxpr(f)(z, z, i, i, i, i))
    assert ("ragged_all_to_all" in text) == has, (impl, text)
    assert ("all_to_all" in text), (impl, text)


for name in sys.argv[1].split(","):
  globals()["check_" + name]()
print("OK", sys.argv[1])
'''


def _run(check: str, rng, *, devices: int = 4, impl: str = "emulated", env=None) -> None:
  """Run SCRIPT's check_<name> for each name in `check` (comma-separated: one jax start)
  on `devices` devices (default: 4 fake CPU devices) with ragged_all_to_all's `impl`;
  fail with its output."""
  env = env or dict(os.environ, JAX_PLATFORMS="cpu",
                    XLA_FLAGS=xla_flags(devices))
  seed = str(int(rng.integers(2**31)))
  proc = subprocess.run([sys.executable, "-c", SCRIPT, check, seed, str(devices), impl],
                        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and f"OK {check}" in proc.stdout, (
      f"seed {seed}\n{proc.stdout}\n{proc.stderr[-4000:]}")


@pytest.mark.parametrize("check", ["forward", "grad", "expert_parallel",
                                   "exchange,packed,tuple_axes,impl,reverse_vjp,lax_traces"])
def test_multi_device(check, rng):
  """The emulation on 4 fake CPU devices: forward, jax.grad / jax.vjp against numpy."""
  _run(check, rng)


@pytest.mark.gpu
@pytest.mark.parametrize("gpu_a2a", list(collectives.GPU_A2A_FLAGS))
def test_real_ragged_all_to_all_on_gpus(gpu_a2a, rng):
  """The real jax.lax.ragged_all_to_all (impl="lax") through mohge_jax.collectives on 2+
  GPUs, under each of XLA:GPU's implementations (mesh.gpu_a2a): forward bitwise against
  numpy, jax.grad and jax.vjp against the hand-derived transpose and the emulation, and the
  expert-parallel exchange's forward and gradients against the single-device layer.
  Run: JAX_PLATFORMS=cuda pytest -m gpu tests."""
  import jax
  gpus = jax.device_count() if jax.default_backend() == "gpu" else 0
  if gpus < 2:
    pytest.skip(f"needs 2+ GPUs (found {gpus})")
  # The subprocess shares the GPUs with this process, which may hold most of their memory.
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "ragged_all_to_all" not in f]
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false",
             XLA_FLAGS=" ".join(flags + list(collectives.GPU_A2A_FLAGS[gpu_a2a])))
  _run("forward,grad,packed,expert_parallel", rng, devices=min(gpus, 8), impl="lax", env=env)


def test_use_gpu_a2a_sets_xla_flags(monkeypatch):
  """mesh.gpu_a2a becomes XLA_FLAGS (kept: flags already there, and a user's own choice of
  ragged-all-to-all flags); an unknown kind is refused by name."""
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
  added = collectives.use_gpu_a2a("nccl")
  assert added == list(collectives.GPU_A2A_FLAGS["nccl"]) and len(added) == 2
  assert os.environ["XLA_FLAGS"].split() == ["--xla_dump_to=/tmp/x", *added]
  assert collectives.use_gpu_a2a("decomposed") == []  # the flags above are a choice now
  monkeypatch.setenv("XLA_FLAGS", "")
  assert collectives.use_gpu_a2a("one_shot") == [] and os.environ["XLA_FLAGS"] == ""
  assert collectives.use_gpu_a2a("decomposed") == [
      "--xla_gpu_unsupported_enable_ragged_all_to_all_decomposer=true"]
  monkeypatch.delenv("XLA_FLAGS")
  collectives.use_gpu_a2a("decomposed")
  assert "ragged_all_to_all_decomposer=true" in os.environ["XLA_FLAGS"]
  with pytest.raises(ValueError, match="gpu_a2a must be one of"):
    collectives.use_gpu_a2a("fast")
  from mohge_jax.config import GPU_A2A_KINDS
  assert tuple(collectives.GPU_A2A_FLAGS) == GPU_A2A_KINDS  # what mesh.gpu_a2a accepts


def test_bad_impl():
  with pytest.raises(ValueError, match="impl"):
    collectives._resolve_impl("nccl")
  assert collectives._resolve_impl("auto") == "emulated"  # tests run on CPU
