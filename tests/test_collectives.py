"""ragged_all_to_all / exchange_sizes against a numpy model of jax.lax.ragged_all_to_all.

The multi-device checks need 4 fake CPU devices, which must be set before jax starts, so
they run in a subprocess (SCRIPT below) with a seed from the `rng` fixture.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from mohge_jax import collectives

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r'''
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P
from mohge_jax.collectives import exchange_sizes, ragged_all_to_all

R = 4
rng = np.random.default_rng(int(sys.argv[2]))
mesh = jax.make_mesh((R,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
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
    for dtype, feat, impl in ((np.float32, (3, 2), "emulated"), (np.int32, (), "auto")):
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
    return ragged_all_to_all(op, out, io, send, oo, recv, axis_name="x")
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


def check_grad():
  for S, n in cases():
    recv, _ = np_exchange(n, S)
    io, oo, C, M = random_layout(n, S)
    op = rng.standard_normal((R, C, 3)).astype(np.float32)
    out = rng.standard_normal((R, M, 3)).astype(np.float32)
    w = rng.standard_normal((R, M, 3)).astype(np.float32)
    f = jax.shard_map(lambda *a: ragged_all_to_all(*a, axis_name="x"), mesh=mesh,
                      in_specs=P("x"), out_specs=P("x"))
    loss = lambda op_, out_: jnp.sum(f(op_, out_, *map(flat, (io, n, oo, recv))) * flat(w))
    d_op, d_out = jax.jit(jax.grad(loss, (0, 1)))(flat(op), flat(out))
    want_op, want_out = np_ragged_grad(w, io, n, oo, C, S)
    assert np.array_equal(np.asarray(d_op).reshape(want_op.shape), want_op), (S, n)
    assert np.array_equal(np.asarray(d_out).reshape(want_out.shape), want_out), (S, n)


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


def _run(check: str, rng) -> None:
  """Run SCRIPT's check_<name> for each name in `check` (comma-separated: one jax start)
  on 4 fake CPU devices; fail with its output."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  seed = str(int(rng.integers(2**31)))
  proc = subprocess.run([sys.executable, "-c", SCRIPT, check, seed], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and f"OK {check}" in proc.stdout, (
      f"seed {seed}\n{proc.stdout}\n{proc.stderr[-4000:]}")


@pytest.mark.parametrize("check", ["forward", "grad", "exchange,packed,tuple_axes,impl"])
def test_multi_device(check, rng):
  _run(check, rng)


def test_bad_impl():
  with pytest.raises(ValueError, match="impl"):
    collectives._resolve_impl("nccl")
  assert collectives._resolve_impl("auto") == "emulated"  # tests run on CPU
