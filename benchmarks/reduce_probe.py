"""How fast float32 rows are added into global memory on this GPU, by the pattern of rows:
the bound under the sparse attention backward's adds into dckr. In the kernel
(`sparse_mla_mma_gpu.sparse_mla_bwd`) they ran at ~2.2 TB/s at 16k, by TMA reduce-adds
and by atomics alike, more than half its time (notes_dsa.md, thirteenth session). Is
that the hardware's rate, or the rows' pattern (many CTAs adding into the same rows at
once)? The answer decides what issue 16's kernel target needs.

    python -m benchmarks.reduce_probe [--seqs 16384,131072] [--patterns dsa,...]
        [--reps 5] [--out benchmarks/results/reduce_probe_h200.json]

Each CTA plays one query of the backward kernel, nothing computed: its selected rows in
steps of KEYS, each row's C + R = 576 float32 (ones, staged in SMEM once) added into
dst[row] by one TMA reduce-add (dst [S, 3, 192], as the kernel's dckr), a step's adds
waited for before the next step's (as the kernel, whose staging is reused). Rows with a
negative index are skipped (the kernel's invalid keys). The rows ([T, topk], S = T):

  dsa          the benchmark's selection (`benchmarks.dsa`'s indexer inputs through
               `select_topk`, lax.top_k's score order; invalid keys last)
  dsa_sorted   the same keys in position order (`top_k_threshold`'s): the CTAs running
               at once (neighbouring queries) sweep the same region of dst together
  dsa_rot      dsa_sorted with query t's steps begun at step t mod N (`rotate=True`)
  distinct     row (t * topk + k) mod S: no two adds at once into one row
  uniform      uniform random rows
  row0         dsa with every invalid key added into row 0 (the kernel before the
               seventeenth session: 6.2% of the adds at 16k)

Rows {seq, pattern, ms, adds, tb_per_s, correct}: tb_per_s counts the rows' bytes added
(576 x 4 a row), correct whether dst equals the row counts (a bincount) in every column.
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from benchmarks.mla_decode import median_seconds

COLS = 576   # C + R of MoHGE-3B's latent + rope key: a row of dckr
KEYS = 32    # rows a step (the backward kernel's BWD_KEYS)
PATTERNS = ("dsa", "dsa_sorted", "dsa_rot", "distinct", "uniform", "row0")


def add_rows(rows_TxK: jax.Array, S: int, *, rotate: bool = False, interpret: bool = False
             ) -> jax.Array:
  """dst [S, COLS] float32: 1 added to every column of dst[r] for each r >= 0 in rows, a
  CTA a row of `rows` (see the module docstring). rotate: CTA t takes its steps from
  t mod N on."""
  T, K = rows_TxK.shape
  if K % KEYS or S < 1:
    raise ValueError(f"rows' width must be a multiple of {KEYS} and S positive; got "
                     f"{K}, S = {S}")
  N, third = K // KEYS, COLS // 3
  rows_TxNxKB = rows_TxK.astype(jnp.int32).reshape(T, N, KEYS)

  def kernel(rows_ref, dst_ref, stage, rows_smem):
    t = lax.axis_index("t")
    rows_smem[...] = plgpu.load(rows_ref.at[t], optimized=False,
                                layout=plgpu.Layout.WG_STRIDED((N, KEYS), vec_size=1))
    stage[...] = plgpu.layout_cast(jnp.ones((KEYS, 3, third), jnp.float32),
                                   plgpu.Layout.WG_STRIDED((KEYS, 3, third), vec_size=1))
    plgpu.commit_smem()

    def step(i, carry):
      st = lax.rem(i + t, N) if rotate else i
      if not interpret:
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      for k in range(KEYS):
        r = rows_smem[st, k]

        @pl.when(r >= 0)
        def _add():
          if interpret:   # the interpreter has no TMA reductions
            dst_ref[r] = dst_ref[r] + stage[k]
          else:
            plgpu.copy_smem_to_gmem(stage.at[k], dst_ref.at[r], commit_group=False,
                                    reduction_op="add")
      if not interpret:
        plgpu.commit_smem_to_gmem_group()
      return carry

    lax.fori_loop(0, N, step, 0)
    if not interpret:
      plgpu.wait_smem_to_gmem(0)

  dst = jax.new_ref(jnp.zeros((S, 3, third), jnp.float32))
  plgpu.kernel(
      kernel, grid=(T,), grid_names=("t",),
      scratch_types=[plgpu.SMEM((KEYS, 3, third), jnp.float32),
                     plgpu.SMEM((N, KEYS), jnp.int32)],
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane,
                                           unsafe_no_auto_barriers=True),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )(rows_TxNxKB, dst)
  return dst[...].reshape(S, COLS)


def pattern_rows(pattern: str, idx_TxK: jax.Array, valid_TxK: jax.Array, seed: int = 0
                 ) -> tuple[jax.Array, bool]:
  """(rows [T, K] int32, rotate) for `pattern` from a selection (idx, valid)."""
  T, K = idx_TxK.shape
  enc = jnp.where(valid_TxK, idx_TxK, -1).astype(jnp.int32)
  if pattern == "dsa":
    return enc, False
  if pattern in ("dsa_sorted", "dsa_rot"):
    return jnp.sort(enc, axis=-1), pattern == "dsa_rot"
  if pattern == "row0":
    return jnp.maximum(enc, 0), False
  if pattern == "distinct":
    return ((jnp.arange(T)[:, None] * K + jnp.arange(K)) % T).astype(jnp.int32), False
  if pattern == "uniform":
    return jax.random.randint(jax.random.key(seed), (T, K), 0, T, jnp.int32), False
  raise ValueError(f"unknown pattern {pattern!r}; choose from {PATTERNS}")


def check(dst_SxC: jax.Array, rows_TxK: jax.Array) -> bool:
  """dst's every column equals the count of each row in rows (negatives not counted)."""
  S = dst_SxC.shape[0]
  r = rows_TxK.reshape(-1)
  counts = jnp.zeros((S,), jnp.float32).at[jnp.where(r >= 0, r, S)].add(1.0, mode="drop")
  return bool(jnp.all(dst_SxC == counts[:, None]))


def selection(seq: int):
  """The benchmark's own selection at `seq` ([seq, topk] idx and valid): `benchmarks.dsa`'s
  indexer inputs through `select_topk` (lax.top_k)."""
  from benchmarks import dsa as bench
  from mohge_jax import sparse_attention as dsa
  x = bench.inputs(seq)
  idx, valid = jax.jit(lambda a, b, c: dsa.select_topk(
      a, b, c, topk=bench.TOPK, chunk=bench.CHUNK)[:2])(x["q_I"], x["w_I"], x["k_I"])
  return idx[0], valid[0]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--seqs", default="16384,131072")
  ap.add_argument("--patterns", default=",".join(PATTERNS))
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--out", default="benchmarks/results/reduce_probe_h200.json")
  ap.add_argument("--session", default="")
  args = ap.parse_args(argv)
  patterns = args.patterns.split(",")
  bad = sorted(set(patterns) - set(PATTERNS))
  if bad:
    ap.error(f"unknown patterns {bad}; choose from {PATTERNS}")
  out = {"device": jax.devices()[0].device_kind, "jax_version": jax.__version__, "rows": []}
  for seq in (int(s) for s in args.seqs.split(",")):
    idx, valid = selection(seq)
    for pattern in patterns:
      rows, rotate = pattern_rows(pattern, idx, valid)
      f = jax.jit(lambda r, rotate=rotate, S=seq: add_rows(r, S, rotate=rotate))
      try:
        dst = f(rows)
        correct = check(dst, rows)
        del dst
        s = median_seconds(f, (rows,), reps=args.reps)
        adds = int(jnp.sum(rows >= 0))
        row = dict(seq=seq, pattern=pattern, ms=round(s * 1e3, 3), adds=adds,
                   tb_per_s=round(adds * COLS * 4 / s / 1e12, 3), correct=correct,
                   session=args.session)
      except Exception as e:  # noqa: BLE001 -- recorded; the next row runs
        row = dict(seq=seq, pattern=pattern, error=f"{type(e).__name__}: {str(e)[:300]}",
                   session=args.session)
      print(json.dumps(row), flush=True)
      out["rows"].append(row)
      with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
