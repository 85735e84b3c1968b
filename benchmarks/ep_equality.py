"""Expert parallelism equals one device, on the real devices: the sharded MoHGE layer and a
full training step, every exchange and placement, float32 and bf16.

    python -m benchmarks.ep_equality [--ep 2] [--parts layer,step] [--dtypes float32,bfloat16]
        [--layer-config configs/mohge_3b.yaml] [--tokens 8192]
        [--step-config configs/mohge_small.yaml] [--batch 8] [--seq 512]
        [--gpu-a2a decomposed|nccl|one_shot] [--out FILE.json]

Each case runs the same parameters and inputs twice in this process: on one device (no
mesh: `dispatch.dispatch_and_combine`) and with the experts split over `--ep` devices
(`expert_parallel.routed_experts` inside `jax.shard_map`: the real collectives, NCCL on
GPUs). Compared, as relative L2 errors ||a - b|| / ||b|| (the worst tensor is named):
- layer: the output, the auxiliary losses, the gradients of every parameter and of the
  input, for a random cotangent;
- step: loss, LM loss, auxiliary losses, gradient norm after one jitted training step, and
  Adam's first moments (0.1 x the clipped gradient) of every parameter.

Tolerances, and why:
- float32 (matmuls at `highest` precision, expert backend `tiled`): the two runs do the same
  arithmetic in a different order (rows grouped differently per device, weight gradients
  summed over devices), so they agree to float32 rounding: 1e-5 (outputs, losses) and
  1e-4 (gradients: sums of many terms, some cancelling).
- bf16 (the kernels on GPUs): rows are rounded to bf16 between the two matmuls and at the
  outputs, and a different summation order flips roundings, so bitwise equality is not
  expected; the scale of those roundings is measured in the same run as the error of the
  one-device bf16 result against the one-device float32 result (`floor`). EP passes when
  its error against one device is at most 2 x floor (plus 1e-6), tensor by tensor:
  expert parallelism adds no error beyond what bf16 itself makes.

`--diagnose` adds the all-to-all exchange through jax's own transpose of
`jax.lax.ragged_all_to_all` (`a2a_impl=lax_autodiff`), which is not asserted.
Exits 1 if any asserted case fails. Writes the table as JSON with --out.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mohge_jax import expert_parallel, sharding
from mohge_jax.collectives import GPU_A2A_FLAGS, use_gpu_a2a
from mohge_jax.config import MeshConfig, load_config

CASES = [("all_to_all", "all_size"), ("all_gather", "all_size"), ("all_to_all", "naive"),
         ("all_gather", "naive")]
TOL_F32 = {"out": 1e-5, "grad": 1e-4}


def rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def leaf_errors(tree_a, tree_b) -> dict[str, float]:
  """{leaf path: relative L2 error}."""
  la = jax.tree_util.tree_leaves_with_path(tree_a)
  return {jax.tree_util.keystr(p): rel(a, b) for (p, a), b in zip(la, jax.tree.leaves(tree_b))}


def precision(dtype: str):
  return (jax.default_matmul_precision("highest") if dtype == "float32"
          else contextlib.nullcontext())


# ----------------------------------------------------------------------------- the layer


def layer_run(cfg, params_f32, x, ct, mesh, a2a_impl=None):
  """(output, aux, grads) of the MoHGE layer on one device (mesh None) or under `mesh`."""
  from mohge_jax.experts import RoutedFFN
  layer = nnx.eval_shape(lambda: RoutedFFN(cfg, cfg.model.ffn, rngs=nnx.Rngs(0)))
  graphdef, _ = nnx.split(layer)

  def loss(params, x):
    y, aux = nnx.merge(graphdef, params)(x.astype(cfg.model.dtype))
    y32 = y.astype(jnp.float32)
    return jnp.sum(y32 * ct) + aux["expert_aux"] + aux["group_aux"], (y32, aux)

  f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  patch = contextlib.nullcontext()
  if a2a_impl:  # route the layer's exchange through another ragged_all_to_all impl
    orig = expert_parallel.routed_experts
    patch = _patched(expert_parallel, "routed_experts",
                     lambda *a, **k: orig(*a, **k, a2a_impl=a2a_impl))
  with precision(cfg.model.dtype), patch:
    if mesh is None:
      (l, (y, aux)), g = f(params_f32, x)
    else:
      with jax.set_mesh(mesh):
        ps = jax.device_put(params_f32, sharding.state_shardings(params_f32, mesh))
        xs = jax.device_put(x, jax.NamedSharding(mesh, jax.P(sharding.BATCH_AXES)))
        (l, (y, aux)), g = f(ps, xs)
  aux = {k: aux[k] for k in ("expert_aux", "group_aux")}
  return jax.device_get((y, aux, g))


@contextlib.contextmanager
def _patched(obj, name, value):
  old = getattr(obj, name)
  setattr(obj, name, value)
  try:
    yield
  finally:
    setattr(obj, name, old)


def layer_cases(args, rng, dtypes, log):
  from mohge_jax.experts import RoutedFFN
  base = load_config(args.layer_config, [f"mesh.expert={args.ep}"])
  m = base.model
  L = min(args.seq, args.tokens)
  B = args.tokens // L
  if B % args.ep or B * L != args.tokens:
    raise SystemExit(f"--tokens {args.tokens} must be a multiple of --ep {args.ep} sequences "
                     f"of min(--seq, --tokens) = {L} tokens")
  cfg_of = lambda dtype, comm, placement, backend: load_config(args.layer_config, [
      f"model.dtype={dtype}", f"model.expert_backend={backend}", f"mesh.expert={args.ep}",
      f"mesh.expert_comm={comm}", f"mesh.placement={placement}"])
  cfg32 = cfg_of("float32", "all_to_all", "all_size", "tiled")
  layer = RoutedFFN(cfg32, m.ffn, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  _, params = nnx.split(layer)
  params = jax.device_get(params)
  x = jnp.asarray(rng.standard_normal((B, L, m.d_model)), jnp.float32)
  ct = jnp.asarray(rng.standard_normal((B, L, m.d_model)) / np.sqrt(B * L), jnp.float32)
  mesh = sharding.make_mesh(cfg32.mesh, jax.devices()[:args.ep])
  ref = layer_run(cfg32, params, x, ct, None)  # one device, float32
  for dtype in dtypes:
    backend = "tiled" if dtype == "float32" else "auto"
    one = ref if dtype == "float32" else layer_run(
        cfg_of(dtype, "all_to_all", "all_size", backend), params, x, ct, None)
    floor = _layer_errors(one, ref) if dtype != "float32" else None
    cases = [(c, p, None) for c, p in CASES]
    if args.diagnose and jax.default_backend() != "cpu":
      cases.append(("all_to_all", "all_size", "lax_autodiff"))
    for comm, placement, impl in cases:
      t0 = time.perf_counter()
      got = layer_run(cfg_of(dtype, comm, placement, backend), params, x, ct, mesh, impl)
      row = _judge({"part": "layer", "config": args.layer_config, "tokens": B * L,
                    "dtype": dtype, "backend": backend, "exchange": comm,
                    "placement": placement, "a2a_impl": impl or "default"},
                   _layer_errors(got, one), floor, asserted=impl is None)
      row["s"] = round(time.perf_counter() - t0, 1)
      log(row)


def _layer_errors(got, want) -> dict:
  (y, aux, (gp, gx)), (wy, waux, (wgp, wgx)) = got, want
  return {"out": {"y": rel(y, wy)}, "aux": {k: rel(aux[k], waux[k]) for k in aux},
          "grad": {**leaf_errors(gp, wgp), "input": rel(gx, wgx)}}


def _judge(row: dict, err: dict, floor: dict | None, *, asserted: bool) -> dict:
  """Adds the worst errors, tolerances and `ok`. float32: fixed tolerances. bf16: every
  tensor's error at most 2 x its floor (the one-device bf16 error against float32)."""
  ok = True
  for k, errs in err.items():
    name, e = max(errs.items(), key=lambda kv: kv[1])
    row[k] = e
    if floor is None:
      tol = TOL_F32["grad" if k == "grad" else "out"]
      ratio = e / tol
    else:
      ratios = {n: v / (2 * floor[k][n] + 1e-6) for n, v in errs.items()}
      name = max(ratios, key=ratios.get)
      ratio = ratios[name]
      row[f"floor_{k}"] = floor[k][name]
    row[f"{k}_vs_tol"] = ratio  # <= 1 passes
    if k == "grad":
      row["worst_grad"] = name
    ok &= ratio <= 1
  row["ok"] = bool(ok) if asserted else None
  return row


# ----------------------------------------------------------------------------- the step


def step_run(cfg, state, batch, mesh):
  from mohge_jax.trainer import graph_def, make_train_step
  step = make_train_step(cfg, graph_def(cfg))
  state = jax.tree.map(jnp.copy, state)  # the step donates its state
  with precision(cfg.model.dtype):
    if mesh is None:
      new, metrics = step(state, batch)
    else:
      with jax.set_mesh(mesh):
        st = jax.device_put(state, sharding.state_shardings(state, mesh))
        b = jax.device_put(batch, sharding.batch_sharding(mesh, leading=1))
        new, metrics = step(st, b)
  mu = new["opt_state"][1][0].mu
  keys = ("loss", "lm_loss", "group_aux", "expert_aux", "grad_norm")
  return jax.device_get(({k: metrics[k] for k in keys}, mu))


def step_cases(args, rng, dtypes, log):
  from mohge_jax.trainer import make_init_fn
  overrides = [f"train.batch_size={args.batch}", f"train.seq_len={args.seq}",
               "train.grad_accum=1", "loss.group_aux_start_step=0", "train.logits_chunk=0",
               f"model.num_layers={args.layers}"]
  cfg_of = lambda dtype, comm, placement, backend, ep: load_config(args.step_config, overrides + [
      f"model.dtype={dtype}", f"model.expert_backend={backend}", f"mesh.expert={ep}",
      f"mesh.expert_comm={comm}", f"mesh.placement={placement}"])
  cfg32 = cfg_of("float32", "all_to_all", "all_size", "tiled", 1)
  state = jax.device_get(jax.jit(make_init_fn(cfg32))())
  V = cfg32.model.vocab_size
  tokens = rng.integers(0, V, (args.batch, args.seq + 1))
  L = args.seq
  batch = {"inputs": tokens[None, :, :-1].astype(np.int32),
           "targets": tokens[None, :, 1:].astype(np.int32),
           "loss_mask": (rng.random((1, args.batch, L)) > 0.1).astype(np.float32),
           "segment_ids": np.zeros((1, args.batch, L), np.int32),
           "positions": np.broadcast_to(np.arange(L), (1, args.batch, L)).astype(np.int32)}
  mesh = sharding.make_mesh(cfg_of("float32", "all_to_all", "all_size", "tiled",
                                   args.ep).mesh, jax.devices()[:args.ep])
  ref = step_run(cfg32, state, batch, None)
  for dtype in dtypes:
    backend = "tiled" if dtype == "float32" else "auto"
    one = ref if dtype == "float32" else step_run(
        cfg_of(dtype, "all_to_all", "all_size", backend, 1), state, batch, None)
    floor = _step_errors(one, ref) if dtype != "float32" else None
    for comm, placement in CASES:
      t0 = time.perf_counter()
      got = step_run(cfg_of(dtype, comm, placement, backend, args.ep), state, batch, mesh)
      row = _judge({"part": "step", "config": args.step_config, "layers": args.layers,
                    "tokens": args.batch * L, "dtype": dtype, "backend": backend,
                    "exchange": comm, "placement": placement, "a2a_impl": "default",
                    "loss_one": float(one[0]["loss"]), "loss_ep": float(got[0]["loss"])},
                   _step_errors(got, one), floor, asserted=True)
      row["s"] = round(time.perf_counter() - t0, 1)
      log(row)


def _step_errors(got, want) -> dict:
  (m, mu), (wm, wmu) = got, want
  return {"out": {k: rel(m[k], wm[k]) for k in ("loss", "lm_loss", "grad_norm")},
          "aux": {k: rel(m[k], wm[k]) for k in ("group_aux", "expert_aux")},
          "grad": leaf_errors(mu, wmu)}


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--ep", type=int, default=2)
  p.add_argument("--parts", default="layer,step")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--layer-config", default="configs/mohge_3b.yaml")
  p.add_argument("--tokens", type=int, default=8192)
  p.add_argument("--step-config", default="configs/mohge_small.yaml")
  p.add_argument("--layers", type=int, default=3)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--seed", type=int, default=None)
  p.add_argument("--diagnose", action="store_true")
  p.add_argument("--gpu-a2a", default=MeshConfig.gpu_a2a, choices=GPU_A2A_FLAGS,
                 help="how XLA:GPU runs the ragged all-to-all (mesh.gpu_a2a)")
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  use_gpu_a2a(args.gpu_a2a)  # before the backend starts
  if jax.device_count() < args.ep:
    sys.exit(f"--ep {args.ep} needs {args.ep} devices; found {jax.device_count()}")
  seed = args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % 2**31)
  rng = np.random.default_rng(seed)
  dtypes = args.dtypes.split(",")
  print(f"devices: {jax.devices()[:args.ep]}; seed {seed}", flush=True)

  rows: list[dict] = []

  def write(done: bool) -> None:  # after every case: a run cut short keeps what it checked
    if args.out:
      with open(args.out, "w") as f:
        json.dump({"device": str(jax.devices()[0].device_kind), "devices": args.ep,
                   "jax": jax.__version__, "date": datetime.date.today().isoformat(),
                   "seed": seed, "gpu_a2a": args.gpu_a2a,
                   "xla_flags": os.environ.get("XLA_FLAGS", ""),
                   "command": " ".join(sys.argv), "complete": done, "rows": rows}, f, indent=1)

  def log(row):
    flag = {True: "ok", False: "FAIL", None: "(diagnostic)"}[row["ok"]]
    print(f"{row['part']:5s} {row['dtype']:8s} {row['backend']:5s} {row['exchange']:10s} "
          f"{row['placement']:8s} {row['a2a_impl']:12s} out {row['out']:.1e} aux "
          f"{row['aux']:.1e} grad {row['grad']:.1e}  error/tolerance {row['out_vs_tol']:.2f} "
          f"{row['aux_vs_tol']:.2f} {row['grad_vs_tol']:.2f} {flag} [{row['s']} s] "
          f"worst {row['worst_grad']}", flush=True)
    rows.append(row)
    write(False)

  parts = args.parts.split(",")
  if "layer" in parts:
    layer_cases(args, rng, dtypes, log)
  if "step" in parts:
    step_cases(args, rng, dtypes, log)
  failed = [r for r in rows if r["ok"] is False]
  print(f"{len(rows)} cases, {len(failed)} failed", flush=True)
  write(True)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
