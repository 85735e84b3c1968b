"""Decode's dense projections as one Mosaic GPU launch: split-K over a thread-block cluster,
the partial products summed through distributed shared memory in a fixed order.

    y [M, N] = splitk_matmul(x [M, K], w [K, N], splits=S)     (reference: `reference`)

Why: a decode step at batch 256 multiplies M = 256 rows by weights of a few MB (MLA's
input and output projections: [1024, 3648], [2048, 1024]). Too few output tiles to fill
132 SMs without splitting K, and XLA's split-K writes float32 partials [S, M, N] to memory
and sums them in a second launch: on the H200 the output projection took 6.8 us plus 4.1
for the sum, 4 MB of weights at ~0.4 TB/s (benchmarks/notes_generate.md, twenty-fourth
session). Here the S CTAs of a cluster each take 1/S of K for one column tile; each
writes its float32 partial tile to its own SMEM, and after a cluster barrier CTA j mod S
sums 64-row tile j of all S partials, read from the peers' SMEM in rank order (the same
sum every run), and stores it in x's dtype. Nothing goes to memory but y. (A partial's
row tiles are separate SMEM buffers: a load through a cluster reference lowers only at
offset 0 in jax 0.11.2.)

Status (benchmarks/notes_generate.md): right on the H200 and slow (twenty-fifth session:
the output projection 26.9 us in MoHGE-3B's decode step at S = 8, against XLA's 6.8 + 4.1
for its split-K and sum, the cluster's sum the slow part; twenty-sixth: with one split,
no cluster sum, the step 3.646 ms against XLA's 3.39). A form with the partials pushed
into the summing CTA's SMEM (`plgpu.async_store_smem`, counted by its barrier) hung on
the H200 and was removed. `model.decode_gemm` keeps XLA's.

Layout of the work: grid N / bn clusters of S CTAs (one warpgroup each); CTA r of cluster
n streams x[:, r K/S : (r+1) K/S] and w[same rows, n bn : (n+1) bn] in bk-deep steps by
TMA through a ring of `depth` slots, one wgmma [M, bk] x [bk, bn] a step into a float32
accumulator [M, bn] (M <= 256: four 64-row wgmmas a step). bf16 or f16 in, float32
accumulation, one rounding at the end.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

MAX_CLUSTER = 8   # portable cluster size on Hopper
MAX_ROWS = 256    # rows of x: the accumulator [M, bn] float32 lives in one warpgroup
SMEM_BYTES = 227 * 1024


def reference(x_MxK: jax.Array, w_KxN: jax.Array) -> jax.Array:
  """Pure JAX: the product with float32 accumulation, in x's dtype."""
  return jnp.dot(x_MxK, w_KxN, preferred_element_type=jnp.float32).astype(x_MxK.dtype)


def unsupported_reason(M: int, K: int, N: int, dtype, *, splits: int, bn: int = 64,
                       bk: int = 64, depth: int = 3) -> str | None:
  """Why these shapes and tiles cannot run (None when they can)."""
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"splitk_matmul takes bfloat16 or float16, got {jnp.dtype(dtype)}"
  if not 1 <= splits <= MAX_CLUSTER:
    return f"splits={splits}: must be 1..{MAX_CLUSTER} (a thread-block cluster)"
  if M % 64 or not 64 <= M <= MAX_ROWS:
    return f"rows M={M}: must be a multiple of 64 up to {MAX_ROWS}"
  if bn % 64 or bk % 64:
    return f"bn={bn}, bk={bk}: must be multiples of 64"
  if N % bn:
    return f"columns N={N}: must be a multiple of bn={bn}"
  if K % (splits * bk):
    return f"contraction K={K}: must be a multiple of splits * bk = {splits * bk}"
  item = jnp.dtype(dtype).itemsize
  partials = M * bn * 4
  smem = depth * (M * bk + bk * bn) * item + partials + 2 * 64 * bn * item
  if smem > SMEM_BYTES:
    return f"SMEM: {smem} bytes for M={M}, bn={bn}, bk={bk}, depth={depth} (> {SMEM_BYTES})"
  return None


def pick_splits(M: int, K: int, N: int, dtype, *, bn: int = 64, bk: int = 64,
                sms: int = 132, max_splits: int = MAX_CLUSTER) -> int | None:
  """The most splits (1, 2, 4, 8; at most max_splits) whose N / bn clusters of S CTAs fit
  on `sms` SMs at once and that the shapes take; None when none does. (In the chained
  benchmark one or two splits ran faster than four or eight: 8-CTA clusters may not all
  find 8 free SMs of one GPC at once. Not yet measured in the decode step.)"""
  ok = [s for s in (1, 2, 4, 8) if s <= max_splits and (N // bn) * s <= max(sms, N // bn)
        and unsupported_reason(M, K, N, dtype, splits=s, bn=bn, bk=bk) is None]
  return max(ok) if ok else None


def splitk_matmul(x_MxK: jax.Array, w_KxN: jax.Array, *, splits: int, bn: int = 64,
                  bk: int = 64, depth: int = 3, interpret: bool = False) -> jax.Array:
  """x [M, K] @ w [K, N] -> [M, N] in x's dtype, float32 accumulation (module docstring).
  splits: CTAs a cluster, each 1/splits of K; bn: output columns a cluster; bk: K a ring
  step; depth: ring slots. interpret: the Pallas GPU interpreter (CPU tests; it has no thread-block clusters, so
  splits=1 only)."""
  M, K = x_MxK.shape
  K2, N = w_KxN.shape
  if K2 != K or x_MxK.dtype != w_KxN.dtype:
    raise ValueError(f"splitk_matmul: x {x_MxK.dtype}{list(x_MxK.shape)} and w "
                     f"{w_KxN.dtype}{list(w_KxN.shape)} do not multiply")
  reason = unsupported_reason(M, K, N, x_MxK.dtype, splits=splits, bn=bn, bk=bk, depth=depth)
  if interpret and splits > 1:
    reason = f"splits={splits} in the interpreter, which has no thread-block clusters"
  if reason:
    raise ValueError(f"splitk_matmul: {reason}")
  return _splitk(x_MxK, w_KxN, splits=splits, bn=bn, bk=bk, depth=depth, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("splits", "bn", "bk", "depth", "interpret"))
def _splitk(x_MxK, w_KxN, *, splits, bn, bk, depth, interpret):
  M, K = x_MxK.shape
  N = w_KxN.shape[1]
  dtype = x_MxK.dtype
  steps = K // splits // bk   # ring steps a CTA
  tiles = M // 64             # 64-row tiles of the output a cluster, summed by CTA j mod S

  def body(x_gmem, w_gmem, y_gmem, x_ring, w_ring, y_smem, bar, done, *parts):
    n = lax.axis_index("n")
    r = lax.axis_index("split")
    k0 = r * steps

    def cluster_sync(i):
      if splits > 1:   # (the interpreter has no clusters: it runs splits=1 only)
        plgpu.barrier_arrive(done.at[i])
        plgpu.barrier_wait(done.at[i])
    acc_MxN = pl.run_scoped(
        functools.partial(k_loop, x_gmem, w_gmem, x_ring, w_ring, bar, n, k0),
        plgpu.ACC((M, bn)))
    for j, part in enumerate(parts):   # parts[j]: this CTA's row tile j, which CTA j mod S reads
      part[...] = acc_MxN[j * 64:(j + 1) * 64]
    plgpu.commit_smem()   # the warpgroup's stores done before its arrivals below
    cluster_sync(0)       # every CTA's partial is in its SMEM
    for j in range(tiles):
      @pl.when(r == j % splits)
      def _(j=j):
        # a buffer a row tile: cluster loads take no offset
        peers = ([parts[j]] if splits == 1 else
                 [plgpu.cluster_ref(parts[j], {"split": jnp.int32(p)}) for p in range(splits)])
        total = peers[0][...]
        for peer in peers[1:]:   # in rank order: the same float32 sum every run
          total = total + peer[...]
        y = y_smem.at[j // splits % 2]
        plgpu.wait_smem_to_gmem(1, wait_read_only=True)   # its store two tiles ago
        y[...] = total.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(y, y_gmem.at[pl.ds(j * 64, 64), pl.ds(n * bn, bn)])
    cluster_sync(1)   # no CTA leaves while a peer may read or write its SMEM
    plgpu.wait_smem_to_gmem(0)

  def k_loop(x_gmem, w_gmem, x_ring, w_ring, bar, n, k0, acc):
    """This CTA's K range through the ring into acc: its value [M, bn] float32."""

    def fetch(t):   # step t of this CTA's K range into ring slot t mod depth
      slot = lax.rem(t, depth)
      k = pl.ds((k0 + t) * bk, bk)
      plgpu.copy_gmem_to_smem(x_gmem.at[:, k], x_ring.at[slot], bar.at[slot])
      plgpu.copy_gmem_to_smem(w_gmem.at[k, pl.ds(n * bn, bn)], w_ring.at[slot], bar.at[slot])

    for t in range(min(depth, steps)):
      fetch(jnp.int32(t))

    def step(t, carry):
      slot = lax.rem(t, depth)
      plgpu.barrier_wait(bar.at[slot])
      plgpu.wgmma(acc, x_ring.at[slot], w_ring.at[slot])
      plgpu.wgmma_wait(0)   # the slot is read: refill it with the step depth ahead

      @pl.when(t + depth < steps)
      def _():
        fetch(t + depth)
      return carry
    lax.fori_loop(0, steps, step, jnp.int32(0))
    return acc[...]

  scratch = (plgpu.SMEM((depth, M, bk), dtype), plgpu.SMEM((depth, bk, bn), dtype),
             plgpu.SMEM((2, 64, bn), dtype),
             plgpu.Barrier(num_arrivals=2, num_barriers=depth),
             plgpu.ClusterBarrier(collective_axes=("split",), num_barriers=2),
             *[plgpu.SMEM((64, bn), jnp.float32) for _ in range(tiles)])
  kernel = plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((M, N), dtype), grid=(N // bn,), grid_names=("n",),
      cluster=(splits,), cluster_names=("split",), scratch_types=scratch,
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=plgpu.InterpretGPUParams() if interpret else None)
  return kernel(x_MxK, w_KxN)
