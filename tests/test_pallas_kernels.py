"""pallas_kernels on CPU: references, the custom_vjp, and the Mosaic TPU kernels run by the
Pallas interpreter, on fresh random inputs (empty experts, one-row experts, ragged tiles,
padding rows)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import metadata
from pallas_kernels import reference as R

TILES = dict(tm=16, tk=32, tn=32)  # small tiles: many ragged tiles at test sizes


def _sizes(rng, e, m, padding, concentration=0.7):
  """Random group sizes with empty and one-row experts, summing to m - padding (also used by
  test_pallas_gpu.py)."""
  total = m - padding
  sizes = rng.multinomial(total - 1, rng.dirichlet(np.full(e, concentration)))
  zero, one, big = rng.choice(e, 3, replace=False)
  sizes[big] += sizes[zero] + sizes[one]  # never negative
  sizes[zero], sizes[one] = 0, 1
  assert sizes.sum() == total and (sizes >= 0).all() and (sizes == 0).any() and (sizes == 1).any()
  return jnp.asarray(sizes, jnp.int32)


def _problem(rng, dtype, widths=(32, 64, 96), n=2, d=64, m=100, padding=7):
  gs = _sizes(rng, len(widths) * n, m, padding)
  nrm = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  x = nrm(m, d).astype(dtype)
  wgu = tuple((nrm(n, d, 2 * w) / np.sqrt(d)).astype(dtype) for w in widths)
  wd = tuple((nrm(n, w, d) / np.sqrt(w)).astype(dtype) for w in widths)
  return gs, x, wgu, wd


def _row_width(gs, widths, n, m):
  """Width of each row's group (0 for padding rows)."""
  w_e = np.repeat(np.asarray(widths), n)
  rows = np.repeat(w_e, np.asarray(gs))
  return np.concatenate([rows, np.zeros(m - rows.size, int)])


def _close(a, b, tol):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  assert np.isfinite(a).all()
  err = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
  assert err < tol, err


TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def test_row_items_cover_every_row_once(rng):
  for _ in range(5):
    e, m, tm = 8, int(rng.integers(1, 300)), 16
    pad = int(rng.integers(0, m))
    gs = _sizes(rng, e, m, pad) if m - pad >= 2 else jnp.zeros(e, jnp.int32).at[0].set(m - pad)
    it = metadata.row_items(gs, m, tm, 2, include_empty=False, include_padding=True)
    k = int(it.num_items)
    seen = np.zeros(m, int)
    for t in range(k):
      seen[int(it.row_start[t]):int(it.row_end[t])] += 1
      assert int(it.row_start[t]) // tm == int(it.tile[t]) or it.row_start[t] == it.row_end[t]
    assert (seen == 1).all()
    assert k <= it.bound


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_hgmm_interpret_up_and_dx(rng, dtype):
  widths, n, m = (32, 64, 96), 2, 100
  gs, x, wgu, _ = _problem(rng, dtype)
  wmax = max(widths)
  gu = pk.hgmm(x, wgu, gs, backend="interpret", out_split=True, **TILES)
  gu_ref = R.hgmm_ref(x, wgu, gs, out_split=True)
  rw = _row_width(gs, widths, n, m)
  cols = np.arange(2 * wmax)
  used = (cols[None] % wmax) < rw[:, None]
  _close(np.where(used, gu, 0), gu_ref, TOL[dtype])
  assert not np.asarray(gu[rw == 0]).any()  # padding rows are 0
  # transposed rhs reading a split-layout lhs (the dx product)
  lhs = jnp.where(used, gu_ref, jnp.nan)  # unused columns must never be read
  dx = pk.hgmm(lhs, wgu, gs, backend="interpret", transpose_rhs=True, lhs_split=True,
               out_cols=x.shape[1], **TILES)
  _close(dx, R.hgmm_ref(gu_ref, wgu, gs, transpose_rhs=True, lhs_split=True,
                        out_cols=x.shape[1]), TOL[dtype])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tgmm_interpret(rng, dtype):
  widths, n, m = (32, 64, 96), 2, 100
  gs, x, wgu, wd = _problem(rng, dtype)
  wmax = max(widths)
  rw = _row_width(gs, widths, n, m)
  dgu = jnp.asarray(rng.normal(size=(m, 2 * wmax)), dtype)
  used = (np.arange(2 * wmax)[None] % wmax) < rw[:, None]
  dgu_nan = jnp.where(used, dgu, jnp.nan)  # unused columns must never be read
  shapes = [w.shape for w in wgu]
  got = pk.tgmm(x, dgu_nan, gs, shapes, backend="interpret", rhs_split=True, **TILES)
  want = R.tgmm_ref(x, dgu, gs, shapes, rhs_split=True)
  for a, b in zip(got, want):
    _close(a, b, TOL[dtype])
  h = jnp.asarray(rng.normal(size=(m, wmax)), dtype)
  got = pk.tgmm(h, x, gs, [w.shape for w in wd], backend="interpret", **TILES)
  for a, b in zip(got, R.tgmm_ref(h, x, gs, [w.shape for w in wd])):
    _close(a, b, TOL[dtype])
  empty = int(np.argmin(np.asarray(gs)))
  assert not np.asarray(got[empty // n][empty % n]).any()


def _ffn_and_grads(backend, x, gs, wgu, wd, ct, **tuning):
  def loss(x, wgu, wd):
    if backend == "ref":
      y = R.expert_ffn_ref(x, gs, wgu, wd)
    else:
      y = pk.expert_ffn(x, gs, wgu, wd, backend=backend, **tuning)
    return jnp.sum(y.astype(jnp.float32) * ct), y
  (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
      x, wgu, wd)
  return y, grads


@pytest.mark.parametrize("backend,dtype", [("reference", jnp.float32),
                                           ("reference", jnp.bfloat16),
                                           ("interpret", jnp.float32),
                                           ("interpret", jnp.bfloat16)])
def test_expert_ffn_forward_and_grads(rng, backend, dtype):
  gs, x, wgu, wd = _problem(rng, dtype)
  ct = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  tuning = TILES if backend == "interpret" else {}
  y, grads = _ffn_and_grads(backend, x, gs, wgu, wd, ct, **tuning)
  y_ref, grads_ref = _ffn_and_grads("ref", x, gs, wgu, wd, ct)
  _close(y, y_ref, TOL[dtype])
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    _close(a, b, 3 * TOL[dtype])
  total = int(gs.sum())
  assert not np.asarray(y[total:]).any()            # padding rows: output 0
  assert not np.asarray(grads[0][total:]).any()     # ... and gradient 0


def test_expert_ffn_moe_equal_widths_under_shard_map(rng):
  gs, x, wgu, wd = _problem(rng, jnp.float32, widths=(64,), n=4, m=64, padding=3)
  mesh = jax.make_mesh((1,), ("ep",))
  spec = jax.sharding.PartitionSpec()

  @jax.jit
  def run(x, wgu, wd):
    f = jax.shard_map(lambda x, wgu, wd: pk.expert_ffn(x, gs, wgu, wd, backend="reference"),
                      mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)
    return jax.value_and_grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1))(x, wgu, wd)

  (val, (dx, dw)) = run(x, wgu, wd)
  ref = lambda x, wgu: jnp.sum(R.expert_ffn_ref(x, gs, wgu, wd) ** 2)
  val_ref, (dx_ref, dw_ref) = jax.value_and_grad(ref, argnums=(0, 1))(x, wgu)
  _close(val, val_ref, 1e-5)
  _close(dx, dx_ref, 1e-5)
  _close(dw[0], dw_ref[0], 1e-5)


def test_dispatch(rng):
  assert pk.resolve_backend("auto") == "reference"  # CPU
  with pytest.raises(ValueError):
    pk.resolve_backend("cuda")
  gs, x, wgu, wd = _problem(rng, jnp.float32)
  with pytest.raises(ValueError):
    pk.expert_ffn(x, gs, wgu[:2], wd, backend="reference")
  bad = np.asarray(gs).copy()
  i, j = rng.choice(len(bad), 2, replace=False)
  bad[i], bad[j] = -1, bad[j] + bad[i] + 1  # same sum, one negative size
  with pytest.raises(ValueError, match=f"expert {i} has -1"):
    pk.expert_ffn(x, jnp.asarray(bad), wgu, wd, backend="reference")
  with pytest.raises(ValueError, match="sum to 101 rows but x has only 100"):
    pk.expert_ffn(x, gs.at[i].add(101 - int(gs.sum())), wgu, wd, backend="reference")


GPU_TILES = dict(bm=64, bn=64, bk=64, bn_up=64, bm_t=64, bn_t=64, bt=64, steps=2, steps_t=2)


def test_mosaic_gpu_kernels_interpreted(rng):
  """The Mosaic GPU kernels one by one (fused SwiGLU up projection, dx reading a
  split-layout lhs, a split-layout plain output, weight gradients) run by the GPU
  interpreter on CPU; unused columns of split-layout inputs hold NaN (never read)."""
  from pallas_kernels import gpu
  widths, n, m, d = (64, 128), 2, 150, 128
  gs, x, wgu, _ = _problem(rng, jnp.bfloat16, widths=widths, n=n, d=d, m=m, padding=9)
  cfg = gpu.Config(interpret=True, **GPU_TILES)
  wmax = max(widths)
  rw = _row_width(gs, widths, n, m)
  used2 = (np.arange(2 * wmax)[None] % wmax) < rw[:, None]
  h, gu = gpu.hgmm(x, wgu, gs, epilogue="swiglu", save_gu=True, cfg=cfg)
  gu_ref = R.hgmm_ref(x, wgu, gs, out_split=True)
  _close(np.where(used2, np.asarray(gu, np.float32), 0), gu_ref, 1e-2)
  _close(np.where(np.arange(wmax)[None] < rw[:, None], np.asarray(h, np.float32), 0),
         R.swiglu_ref(gu_ref), 1e-2)
  (gu_plain,) = gpu.hgmm(x, wgu, gs, out_split=True, out_cols=2 * wmax, cfg=cfg)
  _close(np.where(used2, np.asarray(gu_plain, np.float32), 0), gu_ref, 1e-2)
  assert not np.asarray(gu_plain[rw == 0], np.float32).any()  # padding rows are 0
  # zero_padding=False (expert parallelism's half-padding buffers): the same real rows,
  # without the padding pseudo-expert's work items (padding rows left unwritten)
  skip = gpu.Config(interpret=True, zero_padding=False, **GPU_TILES)
  (gu_skip,) = gpu.hgmm(x, wgu, gs, out_split=True, out_cols=2 * wmax, cfg=skip)
  _close(np.where(used2, np.asarray(gu_skip, np.float32), 0), gu_ref, 1e-2)
  per_expert = np.ones((len(gs) + 1, 6), np.int64)
  work = [int(gpu._hgmm_work(gs, m, 64, len(widths), per_expert, 1, zero)[1][0])
          for zero in (True, False)]
  assert work[0] - work[1] == -(-m // 64) - int(gs.sum()) // 64  # the padding row tiles
  lhs = jnp.where(used2, gu_ref, jnp.nan).astype(jnp.bfloat16)
  (dx,) = gpu.hgmm(lhs, wgu, gs, transpose_rhs=True, lhs_split=True, out_cols=d, cfg=cfg)
  _close(dx, R.hgmm_ref(gu_ref, wgu, gs, transpose_rhs=True, lhs_split=True, out_cols=d),
         1e-2)
  dgu = jnp.asarray(rng.normal(size=(m, 2 * wmax)), jnp.bfloat16)
  shapes = [w.shape for w in wgu]
  got = gpu.tgmm(x, jnp.where(used2, dgu, jnp.nan).astype(jnp.bfloat16), gs, shapes,
                 rhs_split=True, cfg=cfg)
  for a, b in zip(got, R.tgmm_ref(x, dgu, gs, shapes, rhs_split=True)):
    _close(a, b, 1e-2)


def test_stack_weights():
  """Per-group weights → one matrix: stacked by rows when the column counts agree (a
  reshape for one group), else by columns; each expert's block at its offset."""
  from pallas_kernels import gpu
  ws = tuple(jnp.arange(2 * 4 * w, dtype=jnp.float32).reshape(2, 4, w) + 1000 * w
             for w in (3, 5))
  flat, st = gpu.stack_weights(ws)
  assert not st.by_rows and flat.shape == (4, 16)
  off = st.offsets()
  np.testing.assert_array_equal(off, [0, 3, 6, 11])
  for e, (g, i) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
    q = ws[g].shape[2]
    np.testing.assert_array_equal(flat[:, off[e]:off[e] + q], ws[g][i])
  rows = tuple(jnp.swapaxes(w, 1, 2) for w in ws)   # [N, Q_g, 4]: equal columns
  flat, st = gpu.stack_weights(rows)
  assert st.by_rows and flat.shape == (16, 4)
  np.testing.assert_array_equal(flat[6:11], rows[1][0])
  with pytest.raises(ValueError, match="cannot stack"):
    gpu.stack_weights((jnp.zeros((2, 3, 4)), jnp.zeros((2, 5, 6))))


@pytest.mark.parametrize("widths,n", [((64, 128, 64), 2),   # heterogeneous: w_gate_up
                                      ((128,), 3)])          # stacked by columns; MoE: rows
def test_mosaic_gpu_expert_ffn_interpreted(rng, widths, n):
  """expert_ffn forward and gradients through all six Mosaic GPU kernels (GPU interpreter)
  against the pure-JAX reference: ragged tiles, empty and one-row experts, padding rows."""
  gs, x, wgu, wd = _problem(rng, jnp.bfloat16, widths=widths, n=n, d=128, m=150, padding=9)
  ct = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  y, grads = _ffn_and_grads("mosaic_gpu", x, gs, wgu, wd, ct, interpret=True, **GPU_TILES)
  y_ref, grads_ref = _ffn_and_grads("ref", x, gs, wgu, wd, ct)
  _close(y, y_ref, TOL[jnp.bfloat16])
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    _close(a, b, 3 * TOL[jnp.bfloat16])
  total = int(gs.sum())
  assert not np.asarray(y[total:], np.float32).any()          # padding rows: output 0
  assert not np.asarray(grads[0][total:], np.float32).any()   # ... and gradient 0
  empty = int(np.argmin(np.asarray(gs)))
  for dw in (grads[1], grads[2]):                           # an empty expert: gradient 0
    assert not np.asarray(dw[empty // n][empty % n], np.float32).any()


@pytest.mark.parametrize("m", [1, 6, 40])
def test_mosaic_gpu_forward_at_decode_sizes_interpreted(rng, m):
  """Decode batches give the expert layer B * top_k rows (MoHGE-3B at batch 1: 6), fewer
  than one 128-row tile of the default tiling the H200 runs: the forward pass (fused up
  projection, down projection, row-ladder stores) through the GPU interpreter against the
  reference, every row routed (no padding), experts with 0, 1 or a few rows."""
  from pallas_kernels import ffn, gpu
  widths, n, d = (128, 256), 2, 128
  gs = jnp.asarray(rng.multinomial(m, np.full(len(widths) * n, 1 / (len(widths) * n))),
                   jnp.int32)
  _, x, wgu, wd = _problem(rng, jnp.bfloat16, widths=widths, n=n, d=d, m=m, padding=0)
  y = ffn.expert_ffn_with(gpu.GpuOps(interpret=True), x, gs, wgu, wd)
  _close(y, R.expert_ffn_ref(x, gs, wgu, wd), TOL[jnp.bfloat16])


def test_slot_gmm_pdl_lowers_with_the_wait():
  """slot_gmm(pdl=True) lowered for the GPU (on any host): the kernel module carries
  Mosaic GPU's PDL attribute and the grid-dependency wait; without pdl neither."""
  from pallas_kernels import gpu, slot_gpu
  cfg = gpu.Config(num_sms=8, bm=64, bk=128)
  st = gpu.Stacking.of([(2, 128, 2 * w) for w in (64, 128)])
  flat = jax.ShapeDtypeStruct((sum(2 * w for w in (64, 128)) * 2 // cfg.bn_up * 128,
                               cfg.bn_up), jnp.bfloat16)
  x = jax.ShapeDtypeStruct((4 * 64, 128), jnp.bfloat16)
  for pdl in (False, True):
    text = jax.jit(lambda flat, x, pdl=pdl: slot_gpu.slot_gmm(
        x, (flat, st), rows_per_expert=64, swiglu=True, out_cols=128, cfg=cfg, pdl=pdl)
    ).trace(flat, x).lower(lowering_platforms=("cuda",)).as_text()
    assert ("mosaic_gpu.uses_pdl" in text) == pdl and ("griddepcontrol.wait" in text) == pdl


@pytest.mark.parametrize("used", [1, 64, 65, 150, 192])
def test_slot_gmm_passes_over_the_used_row_tiles(rng, used):
  """slot_gmm(rows_used=): C = 192 rows an expert (3 row tiles of 64), of which the first
  `used` are needed: the kernels run ceil(used / 64) passes of one row tile of every expert
  (a pass walks the same SM ranges, the copy ring runs on across passes), and those tiles'
  rows equal the whole block's through the kernels without passes (and the reference), for
  the up projection with SwiGLU and the down projection (groups innermost), 5 SMs, some
  with steps across a pass's end in their ring. rows_used must be int32 [1]."""
  from pallas_kernels import gpu, slot_gpu
  widths, n, d, rows = (64, 192, 128), 2, 128, 192
  e = len(widths) * n
  gs = jnp.full((e,), rows, jnp.int32)
  _, x, wgu, wd = _problem(rng, jnp.bfloat16, widths=widths, n=n, d=d, m=e * rows, padding=0)
  cfg = gpu.Config(interpret=True, num_sms=5, **dict(GPU_TILES, steps=3))
  wmax = max(widths)
  up = slot_gpu.tile_weights(*gpu.stack_weights(wgu), cfg, swiglu=True)
  down = slot_gpu.tile_weights(*gpu.stack_weights(wd), cfg, swiglu=False)
  count = jnp.asarray([used], jnp.int32)
  tiles = -(-used // 64)
  done = (np.arange(e * rows) % rows) < tiles * 64            # rows of the passes run
  width_ok = np.arange(wmax)[None] < _row_width(gs, widths, n, e * rows)[:, None]
  h_all = slot_gpu.slot_gmm(x, up, rows_per_expert=rows, swiglu=True, out_cols=wmax, cfg=cfg)
  h = slot_gpu.slot_gmm(x, up, rows_per_expert=rows, swiglu=True, out_cols=wmax, cfg=cfg,
                        rows_used=count)
  keep = done[:, None] & width_ok
  np.testing.assert_array_equal(np.asarray(h)[keep], np.asarray(h_all)[keep])
  h_ref = R.swiglu_ref(R.hgmm_ref(x, wgu, gs, out_split=True))
  _close(np.where(keep, np.asarray(h, np.float32), 0), np.where(keep, h_ref, 0), 1e-2)
  h_in = jnp.where(width_ok, h_all, jnp.nan).astype(jnp.bfloat16)
  y_all = slot_gpu.slot_gmm(h_in, down, rows_per_expert=rows, swiglu=False, out_cols=d, cfg=cfg)
  y = slot_gpu.slot_gmm(h_in, down, rows_per_expert=rows, swiglu=False, out_cols=d, cfg=cfg,
                        rows_used=count)
  np.testing.assert_array_equal(np.asarray(y)[done], np.asarray(y_all)[done])
  _close(np.asarray(y, np.float32)[done],
         np.asarray(R.hgmm_ref(h_ref.astype(jnp.bfloat16), wd, gs, out_cols=d))[done], 1e-2)
  with pytest.raises(ValueError, match="rows_used must be int32"):
    slot_gpu.slot_gmm(x, up, rows_per_expert=rows, swiglu=True, out_cols=wmax, cfg=cfg,
                      rows_used=jnp.asarray(used, jnp.int32))


def test_slot_gmm_active_lowers_for_cuda():
  """slot_gmm_active lowered for the GPU (on any host) at MoHGE-3B's decode shapes (64
  experts of 8 widths, 6 listed, the decode tiles): both projections lower to Mosaic GPU."""
  from pallas_kernels import gpu, slot_gpu
  widths, n, d, C = (384, 512, 640, 768, 896, 1024, 1152, 1280), 8, 1024, 64
  cfg = gpu.Config(bm=64, bk=128, num_sms=132)
  for swiglu in (True, False):
    st = gpu.Stacking.of([(n, d, 2 * w) if swiglu else (n, w, d) for w in widths])
    bn = cfg.bn_up if swiglu else cfg.bn
    cols = sum(q for _, q in st.shapes) * n if not st.by_rows else st.shapes[0][1]
    rows = st.shapes[0][0] if not st.by_rows else sum(p for p, _ in st.shapes) * n
    flat = jax.ShapeDtypeStruct((cols // bn * rows, bn), jnp.bfloat16)
    lhs = jax.ShapeDtypeStruct((64 * C, d if swiglu else max(widths)), jnp.bfloat16)
    out = max(widths) if swiglu else d
    text = jax.jit(lambda f, x, a, st=st, swiglu=swiglu, out=out: slot_gpu.slot_gmm_active(
        x, (f, st), a, rows_per_expert=C, swiglu=swiglu, out_cols=out, cfg=cfg)).trace(
        flat, lhs, jax.ShapeDtypeStruct((6,), jnp.int32)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@pytest.mark.parametrize("active,steps", [((4, 0, -1, 3), 2), ((5,), 3), ((-1, -1), 2)])
def test_slot_gmm_active_computes_the_listed_experts_only(rng, active, steps):
  """slot_gmm_active: the first row tile of each listed expert (-1: none) equals the whole
  block's through `slot_gmm`, for the SwiGLU up projection of experts of three widths and
  the down projection (the items, (listed expert, column tile), spread over 5 SMs in
  turn; items past a narrower group's columns skipped; the unlisted experts' rows, never
  written, are not compared). Bad arguments are refused."""
  from pallas_kernels import gpu, slot_gpu
  widths, n, d, rows = (64, 192, 128), 2, 128, 128
  e = len(widths) * n
  gs = jnp.full((e,), rows, jnp.int32)
  _, x, wgu, wd = _problem(rng, jnp.bfloat16, widths=widths, n=n, d=d, m=e * rows, padding=0)
  cfg = gpu.Config(interpret=True, num_sms=5, **dict(GPU_TILES, steps=steps))
  wmax = max(widths)
  up = slot_gpu.tile_weights(*gpu.stack_weights(wgu), cfg, swiglu=True)
  down = slot_gpu.tile_weights(*gpu.stack_weights(wd), cfg, swiglu=False)
  act = jnp.asarray(active, jnp.int32)
  listed = np.zeros(e * rows, bool)
  for a in active:
    if a >= 0:
      listed[a * rows:a * rows + 64] = True
  width_ok = np.arange(wmax)[None] < _row_width(gs, widths, n, e * rows)[:, None]
  h_all = slot_gpu.slot_gmm(x, up, rows_per_expert=rows, swiglu=True, out_cols=wmax, cfg=cfg)
  h = slot_gpu.slot_gmm_active(x, up, act, rows_per_expert=rows, swiglu=True,
                               out_cols=wmax, cfg=cfg)
  keep = listed[:, None] & width_ok
  np.testing.assert_array_equal(np.asarray(h)[keep], np.asarray(h_all)[keep])
  h_in = jnp.where(width_ok, h_all, jnp.nan).astype(jnp.bfloat16)
  y_all = slot_gpu.slot_gmm(h_in, down, rows_per_expert=rows, swiglu=False, out_cols=d,
                            cfg=cfg)
  y = slot_gpu.slot_gmm_active(h_in, down, act, rows_per_expert=rows, swiglu=False,
                               out_cols=d, cfg=cfg)
  np.testing.assert_array_equal(np.asarray(y)[listed], np.asarray(y_all)[listed])
  h_ref = R.swiglu_ref(R.hgmm_ref(x, wgu, gs, out_split=True))
  if listed.any():
    _close(np.asarray(y, np.float32)[listed], np.asarray(
        R.hgmm_ref(h_ref.astype(jnp.bfloat16), wd, gs, out_cols=d))[listed], 1e-2)
  with pytest.raises(ValueError, match="active must be int32"):
    slot_gpu.slot_gmm_active(x, up, act.astype(jnp.float32), rows_per_expert=rows,
                             swiglu=True, out_cols=wmax, cfg=cfg)
  with pytest.raises(ValueError, match="at least 2 steps"):
    slot_gpu.slot_gmm_active(x, up, act, rows_per_expert=rows, swiglu=True, out_cols=wmax,
                             cfg=gpu.Config(interpret=True, num_sms=5,
                                            **dict(GPU_TILES, steps=1)))


@pytest.mark.parametrize("rows,sms,steps,widths,n", [
    (64, 3, 2, (64, 192, 128), 2),
    (128, 5, 3, (64, 192, 128), 2),
    (64, 7, 3, (128,), 3)])   # MoE (stacked by rows); SMs with fewer steps than the ring, none
def test_slot_gmm_interpreted(rng, rows, sms, steps, widths, n):
  """The decode kernels (`slot_gpu`: fixed slot blocks of `rows` rows an expert, one copy
  ring per SM across its work items, tiled weights) in the GPU interpreter against the
  reference: the SwiGLU up projection and the down projection of heterogeneous experts
  (w_gate_up stacked side by side) or of one group (MoE: stacked by rows), several items
  an SM, items of different K lengths, 1 or 2 row tiles an expert; the step cursor
  against the stacked offsets at every step; the SMs' shares cover every step once."""
  from pallas_kernels import gpu, slot_gpu
  d = 128
  e = len(widths) * n
  gs = jnp.full((e,), rows, jnp.int32)
  _, x, wgu, wd = _problem(rng, jnp.bfloat16, widths=widths, n=n, d=d, m=e * rows, padding=0)
  cfg = gpu.Config(interpret=True, num_sms=sms, **dict(GPU_TILES, steps=steps))
  wmax = max(widths)
  rhs_up = slot_gpu.tile_weights(*gpu.stack_weights(wgu), cfg, swiglu=True)
  h = slot_gpu.slot_gmm(x, rhs_up, rows_per_expert=rows, swiglu=True, out_cols=wmax, cfg=cfg)
  used = np.arange(wmax)[None] < _row_width(gs, widths, n, e * rows)[:, None]
  h_ref = R.swiglu_ref(R.hgmm_ref(x, wgu, gs, out_split=True))
  _close(np.where(used, np.asarray(h, np.float32), 0), h_ref, 1e-2)
  # pdl: the prologue's weight copies before its lhs copies (the wait itself is GPU-only)
  h_pdl = slot_gpu.slot_gmm(x, rhs_up, rows_per_expert=rows, swiglu=True, out_cols=wmax,
                            cfg=cfg, pdl=True)
  np.testing.assert_array_equal(np.asarray(h_pdl)[used], np.asarray(h)[used])
  y = slot_gpu.slot_gmm(jnp.where(used, h, jnp.nan).astype(jnp.bfloat16),  # unused: never read
                        slot_gpu.tile_weights(*gpu.stack_weights(wd), cfg, swiglu=False),
                        rows_per_expert=rows, swiglu=False, out_cols=d, cfg=cfg)
  _close(y, R.hgmm_ref(h_ref.astype(jnp.bfloat16), wd, gs, out_cols=d), 1e-2)
  with pytest.raises(ValueError, match="is not the tiled matrix of these weights"):
    slot_gpu.slot_gmm(x, gpu.stack_weights(wgu), rows_per_expert=rows, swiglu=True,
                      out_cols=wmax, cfg=cfg)
  flat, st = gpu.stack_weights(wd)   # block (kb, fb) of the tiled matrix is the stacked one's
  tiled = np.asarray(slot_gpu.tile_weights(flat, st, cfg, swiglu=False)[0])
  kb, fb = int(rng.integers(flat.shape[0] // cfg.bk)), int(rng.integers(d // cfg.bn))
  row = (fb * (flat.shape[0] // cfg.bk) + kb) * cfg.bk
  np.testing.assert_array_equal(tiled[row:row + cfg.bk], np.asarray(
      flat[kb * cfg.bk:(kb + 1) * cfg.bk, fb * cfg.bn:(fb + 1) * cfg.bn]))
  for w, swiglu in ((wgu, True), (wd, False)):
    st = gpu.stack_weights(w)[1]
    layout = slot_gpu._Layout.of(st, rows, swiglu, cfg)
    # the down projection of different widths: groups innermost (the up projection's K is
    # d for every group; MoE's one group)
    assert layout.interleaved == (not swiglu and len(widths) > 1)
    want = []   # every step in order, from the stacked offsets directly
    off, bn = st.offsets(), (cfg.bn_up if swiglu else cfg.bn)
    items = sorted(layout.items(), key=lambda i: (i[1], i[2], i[3], i[0]) if layout.interleaved
                   else i)   # the order by the loops it claims
    assert layout.items() == items and len(set(items)) == len(items)
    assert len(items) == sum(n * (rows // cfg.bm) * (q // 2 if swiglu else q) // bn
                             for p, q in st.shapes)
    for g, el, r, c in items:
      ex = g * n + el
      p, q = st.shapes[g]
      for kk in range(p // cfg.bk):
        row = ex * (rows // cfg.bm) + r
        rk, f0 = (off[ex] // cfg.bk + kk, c) if st.by_rows else (kk, off[ex] // bn + c)
        want.append((row, kk, rk, f0, f0 + q // 2 // bn if swiglu else -1, c))
    def walk(cur, pos):   # the kernel's per-step cursor against a fresh one at each step
      b = layout.blocks(cur)
      rhs = (*b["rhs"], -1)[:3] if not swiglu else b["rhs"]
      row = jnp.stack([b["lhs"][0], b["lhs"][1], rhs[0], rhs[1], rhs[2], b["out_col"]])
      return layout.advance(cur), (row, jnp.stack(cur), jnp.stack(layout.cursor(pos)))
    _, (got, walked, fresh) = jax.lax.scan(walk, layout.cursor(jnp.int32(0)),
                                           jnp.arange(layout.num_steps, dtype=jnp.int32))
    if not swiglu:
      got = got.at[:, 4].set(-1)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(walked), np.asarray(fresh))
    ranges = slot_gpu.sm_ranges(layout, sms)
    assert ranges[0, 0] == 0 and (ranges[1:, 0] == ranges[:-1, :2].sum(1)).all()
    assert ranges[:, 1].sum() == layout.num_steps
    assert set(ranges[:, 0]) <= {0, *layout.item_ends()}   # cut at item ends
    assert ranges[:, 2].sum() == len(layout.item_ends())
    if sms == 7:
      assert ranges[:, 1].min() < steps   # a short share (or an idle SM) runs too


def test_slot_shares_of_mohge_3b_down_projection():
  """MoHGE-3B's down projection at decode (K of 3..10 steps by group, 8 column tiles each)
  on 132 SMs: with the groups innermost the largest contiguous share is within a step of
  the mean (26 against 25.2), where group by group it is 30."""
  from pallas_kernels import gpu, slot_gpu
  from mohge_jax import dispatch
  cfg = dispatch.kernel_config()
  st = gpu.Stacking.of([(8, w, 1024) for w in (384, 512, 640, 768, 896, 1024, 1152, 1280)])
  layout = slot_gpu._Layout.of(st, 64, False, cfg)
  grouped = dataclasses.replace(layout, interleaved=False)
  assert layout.interleaved and layout.num_steps == grouped.num_steps == 3328
  largest = {lay.interleaved: int(slot_gpu.sm_ranges(lay, 132)[:, 1].max())
             for lay in (layout, grouped)}
  assert largest == {True: 26, False: 30}
