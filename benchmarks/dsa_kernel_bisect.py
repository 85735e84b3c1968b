"""Localise a wrong result of the DSA forward kernel (pallas_kernels/sparse_mla_gpu.py) on a
Hopper GPU: each stage of the kernel alone against a float32 JAX reference on the same
bf16 inputs, printing max abs / relative errors as it goes (each part under its own
try/except, so a failing or hanging-then-erroring part does not stop the next).

    PYTHONPATH=. timeout 600 python -m benchmarks.dsa_kernel_bisect            # H200, ~1-3 min
    PYTHONPATH=. python -m benchmarks.dsa_kernel_bisect --lower-only           # CPU: lowers every
                                                # mode x variant for CUDA (no GPU needed)
    PYTHONPATH=. python -m benchmarks.dsa_kernel_bisect --interpret --small    # CPU: all parts in
                                                # the GPU interpreter (~2 min; with --quick, one
                                                # variant a part: tests/test_sparse_mla_bisect.py)

Parts, in the order of the kernel's data flow (the kernel's debug `mode`s, MODES):
  lower     every mode x split x tiles_per_copy lowers for CUDA (only with --lower-only,
            or first on CPU; on the GPU the runs below compile for real)
  copy_q    o = q_lat read back from the padded q tile: the q TMA load (16 of 64 rows of a
            swizzled tile) and the output path (registers -> swizzled tile -> TMA store)
  gather    the gathered key rows of every step (one-row TMA copies -> staging -> swizzled
            key tile), all four variants; on a mismatch the fraction of wrong elements per
            128-byte column tile and per key slot mod 8 (a swizzle signature). Then the
            first version's staging (inferred_stage=True: tile (1, 64) + 128-byte swizzle
            chosen by layout inference), which the diagnosis says is wrong at 3 tiles per
            copy in column tiles 1, 2, 4, 5, 7, 8 (OK or BAD at 1 tile per copy: whether
            TMA swizzles one-row boxes by address)
  scores    s = scale * q . k over C+R before the mask: a fixed selection (key j = row j)
            and a random one; error per head row
  probs     the online softmax without P.V: each step's exp(s - running max) and the LSE
  full      the attention: one query with one key step; many queries with one step; many
            queries with several steps (all four variants: split "cta" is one warpgroup
            per CTA with no cross-warpgroup handshake, "warpgroup" the two warpgroups
            sharing the gather); a larger T with K = 2048 (32 steps)
Reading: the first part that is BAD is where the fault is (copy_q bad: q load or output
store; gather bad only with tiles_per_copy = 3: the staging column subviews; gather good
and scores bad: the score wgmma / q tile; probs bad: mask or softmax layouts; only full
bad: P through SMEM / the P.V wgmma / the 1/l rescale; only split "warpgroup" bad: the
k_ready / k_consumed / done handshakes).
"""
from __future__ import annotations

import argparse
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import sparse_mla_gpu as kern

H = 16
KEYS = kern.KEYS
VARIANTS = [(s, t) for s in ("warpgroup", "cta") for t in (3, 1)]


def problem(rng, B, T, S, C, R, K, *, fixed=False, invalid=0.2):
  """bf16 q_lat [B,T,H,C], q_rope, ckr [B,S,C+R], int32 idx [B,T,K] (-1 = invalid)."""
  bf = lambda *s: jnp.asarray(rng.normal(size=s) / np.sqrt(s[-1]), jnp.bfloat16)  # noqa: E731
  q_lat, q_rope = bf(B, T, H, C), bf(B, T, H, R)
  ckr = jnp.asarray(rng.normal(size=(B, S, C + R)), jnp.bfloat16)
  if fixed:
    idx = np.broadcast_to(np.arange(K) % S, (B, T, K)).copy()
  else:
    idx = rng.integers(0, S, size=(B, T, K))
    idx[rng.random(size=idx.shape) < invalid] = -1
    idx[:, :, 0] = rng.integers(0, S, size=(B, T))  # every query has a valid key
  return q_lat, q_rope, ckr, jnp.asarray(idx, jnp.int32)


@jax.jit
def reference(q_lat, q_rope, ckr, idx, scale):
  """float32 (HIGHEST) on the bf16 inputs: gathered rows, scores, per-step p, o, lse, with
  the kernel's padding of K to a multiple of 64 (idx -1 -> row 0, score -1e30)."""
  B, T, _, C = q_lat.shape
  K = idx.shape[-1]
  Kp = -(-K // KEYS) * KEYS
  idxp = jnp.pad(idx, ((0, 0), (0, 0), (0, Kp - K)), constant_values=-1)
  g = jax.vmap(lambda c, r: c[r])(ckr, jnp.maximum(idxp, 0))  # [B,T,Kp,CR] bf16
  gf = g.astype(jnp.float32)
  q = jnp.concatenate([q_lat, q_rope], -1).astype(jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  s = scale * jnp.einsum("bthd,btkd->bthk", q, gf, precision=hi)
  sm = jnp.where((idxp >= 0)[:, :, None, :], s, -1e30)
  steps = sm.reshape(B, T, H, Kp // KEYS, KEYS)
  m_run = jax.lax.cummax(steps.max(-1), axis=3)
  probs = jnp.exp(steps - m_run[..., None]).reshape(B, T, H, Kp)
  m = m_run[..., -1]
  p = jnp.exp(sm - m[..., None])
  l = p.sum(-1)
  o = jnp.einsum("bthk,btkc->bthc", p, gf[..., :C], precision=hi) / l[..., None]
  return dict(gather=g, scores=s, probs=probs, o=o, lse=m + jnp.log(l))


def errs(got, ref):
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  if not np.isfinite(got).all():
    return float("inf"), float("inf")
  d = np.abs(got - ref)
  return float(d.max()), float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


def line(name, got, ref, tol_abs=None, tol_rel=None, extra=""):
  mx, rel = errs(got, ref)
  ok = (tol_abs is None or mx <= tol_abs) and (tol_rel is None or rel <= tol_rel)
  print(f"    {name:>8}: max abs err {mx:.3g}  rel err {rel:.3g}  "
        f"{'OK' if ok else 'BAD'}{extra}", flush=True)
  return ok


def gather_signature(got, ref, w):
  """Fraction of wrong elements per 128-byte column tile and per key slot mod 8."""
  bad = np.asarray(got, np.float32) != np.asarray(ref, np.float32)  # [B,T,Kp,CR]
  Kp, CR = bad.shape[-2:]
  per_tile = bad.reshape(-1, Kp, CR // w, w).mean(axis=(0, 1, 3))
  per_slot = bad.reshape(-1, Kp // 8, 8, CR).mean(axis=(0, 1, 3))
  return (f"\n              wrong per column tile {np.round(per_tile, 2).tolist()}"
          f"\n              wrong per key slot mod 8 {np.round(per_slot, 2).tolist()}")


def head_signature(got, ref):
  """max abs error per head row (the heads are rows 0..H-1 of the 64-row wgmma tile)."""
  d = np.abs(np.asarray(got, np.float64) - np.asarray(ref, np.float64))
  d = np.where(np.isfinite(d), d, np.inf)
  return f"\n              max err per head {np.round(d.reshape(-1, H, d.shape[-1]).max(axis=(0, 2)), 4).tolist()}"


def run_mode(args, mode, split, tpc, interpret, scale, inferred_stage=False):
  f = jax.jit(lambda *a: kern.sparse_mla_fwd(*a, scale=scale, split=split, tiles_per_copy=tpc,
                                             mode=mode, interpret=interpret,
                                             inferred_stage=inferred_stage))
  return jax.block_until_ready(f(*args))


def parts(small: bool):
  """(name, mode, variants, problem kwargs) of every part after `lower`."""
  if small:  # the GPU interpreter on CPU: C = 128 (3 column tiles: tiles_per_copy 3 and 1)
    C, R = 128, 64
    many = dict(B=2, T=2, S=7, K=130)
    return [
        ("copy_q", "copy_q", VARIANTS[:1] + VARIANTS[3:], dict(B=1, T=2, S=5, K=64)),
        ("gather", "gather", VARIANTS, many),
        ("scores fixed selection", "scores", VARIANTS[:1], dict(B=1, T=2, S=70, K=64,
                                                                 fixed=True)),
        ("scores", "scores", VARIANTS[3:], many),
        ("probs", "probs", VARIANTS[:1], many),
        ("full, 1 query, 1 step", "full", VARIANTS[:1], dict(B=1, T=1, S=3, K=64)),
        ("full, many queries, 3 steps", "full", VARIANTS[:1] + VARIANTS[3:], many),
    ], C, R
  C, R = 512, 64
  many = dict(B=2, T=64, S=1000, K=256)
  return [
      ("copy_q", "copy_q", [VARIANTS[0], VARIANTS[3]], dict(B=2, T=64, S=100, K=64)),
      ("gather", "gather", VARIANTS, many),
      ("gather, old staging (inferred swizzle; expect BAD at tpc 3)", "gather",
       [VARIANTS[0], VARIANTS[1]], dict(many, inferred_stage=True)),
      ("scores fixed selection", "scores", [VARIANTS[0], VARIANTS[3]],
       dict(B=1, T=64, S=300, K=256, fixed=True)),
      ("scores", "scores", [VARIANTS[0], VARIANTS[3]], many),
      ("probs", "probs", [VARIANTS[0], VARIANTS[3]], many),
      ("full, 1 query, 1 step", "full", [VARIANTS[0], VARIANTS[3]], dict(B=1, T=1, S=64, K=64)),
      ("full, many queries, 1 step", "full", [VARIANTS[0], VARIANTS[3]],
       dict(B=2, T=256, S=1000, K=64)),
      ("full, many queries, 4 steps", "full", VARIANTS, many),
      ("full, T=512, K=2048 (32 steps)", "full", [VARIANTS[0], VARIANTS[3]],
       dict(B=1, T=512, S=4096, K=2048)),
  ], C, R


def check(mode, out, ref, w):
  """Prints the comparison of one run; True when within tolerance."""
  if mode == "copy_q":
    return line("o=q_lat", out[0], ref["q_lat"], tol_abs=0.0)
  o, lse, *dbg = out
  if mode == "gather":
    ok = line("rows", dbg[0], ref["gather"], tol_abs=0.0)
    if not ok:
      print(gather_signature(dbg[0], ref["gather"], w)[1:], flush=True)
    return ok
  if mode == "scores":
    ok = line("s", dbg[0], ref["scores"], tol_rel=1e-3)
    if not ok:
      print(head_signature(dbg[0], ref["scores"])[1:], flush=True)
    return ok
  if mode == "probs":
    ok = line("p", dbg[0], ref["probs"], tol_abs=2e-3)
    if not ok:
      print(head_signature(dbg[0], ref["probs"])[1:], flush=True)
    return line("lse", lse, ref["lse"], tol_abs=2e-3) and ok
  ok = line("o", o, ref["o"], tol_rel=2e-2)
  if not ok:
    print(head_signature(o, ref["o"])[1:], flush=True)
  return line("lse", lse, ref["lse"], tol_abs=2e-3) and ok


def lower_all(C, R, T=64, K=256):
  sds = jax.ShapeDtypeStruct
  bf = jnp.bfloat16
  ok = True
  for mode in kern.MODES:
    for split, tpc in VARIANTS:
      f = jax.jit(lambda *a, m=mode, s=split, t=tpc: kern.sparse_mla_fwd(
          *a, scale=0.04, split=s, tiles_per_copy=t, mode=m))
      try:
        f.trace(sds((1, T, H, C), bf), sds((1, T, H, R), bf), sds((1, T, C + R), bf),
                sds((1, T, K), jnp.int32)).lower(lowering_platforms=("cuda",))
      except Exception as e:  # noqa: BLE001
        ok = False
        print(f"  lower {mode} {split} tpc{tpc}: FAILED {type(e).__name__}: {str(e)[:400]}",
              flush=True)
  print(f"  lower: every mode x variant at C={C} R={R}: {'OK' if ok else 'BAD'}", flush=True)
  return ok


def main(argv=None) -> dict[str, bool]:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--interpret", action="store_true", help="the GPU interpreter (CPU)")
  ap.add_argument("--small", action="store_true", help="tiny shapes (for the interpreter)")
  ap.add_argument("--lower-only", action="store_true", help="only lower every variant for CUDA")
  ap.add_argument("--quick", action="store_true",
                  help="one variant a part (warpgroup, 3 tiles per copy; gather also cta, 1)"
                  " and no lowering: the CPU test")
  ap.add_argument("--seed", type=int, default=0)
  a = ap.parse_args(argv)
  t00 = time.time()
  print(f"jax {jax.__version__}, devices {jax.devices()}", flush=True)
  table, C, R = parts(a.small)
  results: dict[str, bool] = {}
  if a.lower_only or (jax.default_backend() == "cpu" and not a.quick):
    try:
      results["lower"] = lower_all(512, 64) and (not a.small or lower_all(C, R))
    except Exception:  # noqa: BLE001
      traceback.print_exc()
      results["lower"] = False
    if a.lower_only:
      return results
  interpret = a.interpret or jax.default_backend() == "cpu"
  rng = np.random.default_rng(a.seed)
  w = 64
  scale = 0.1
  for name, mode, variants, kw in table:
    if a.quick:
      variants = variants[:1] + ([VARIANTS[3]] if mode == "gather" else [])
    t0 = time.time()
    print(f"[{name}] mode={mode} {kw}", flush=True)
    kw = dict(kw)
    inferred_stage = kw.pop("inferred_stage", False)
    try:
      args = problem(rng, C=C, R=R, **kw)
      ref = {k: np.asarray(v) for k, v in reference(*args, scale).items()}
      ref["q_lat"] = np.asarray(args[0], np.float32)
    except Exception:  # noqa: BLE001
      traceback.print_exc()
      results[name] = False
      continue
    for split, tpc in variants:
      key = f"{name} / {split} tpc{tpc}"
      print(f"  {split} tiles_per_copy={tpc}", flush=True)
      try:
        out = run_mode(args, mode, split, tpc, interpret, scale, inferred_stage)
        results[key] = check(mode, out, ref, w)
      except Exception as e:  # noqa: BLE001
        print(f"    FAILED {type(e).__name__}: {str(e)[:600]}", flush=True)
        results[key] = False
    print(f"  ({time.time() - t0:.1f} s)", flush=True)
  bad = [k for k, v in results.items() if not v]
  print(f"done in {time.time() - t00:.0f} s: {len(results) - len(bad)}/{len(results)} OK"
        + (f"; first BAD: {bad[0]}" if bad else ""), flush=True)
  return results


if __name__ == "__main__":
  main()
