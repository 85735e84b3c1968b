"""The ragged all-to-all alone on the local GPUs, under each of XLA:GPU's implementations.

    python -m benchmarks.ragged_a2a_probe [--rows 786432] [--d 1024] [--kinds decomposed,nccl]

Each kind of `collectives.GPU_A2A_FLAGS` (mesh.gpu_a2a) runs in its own process, since XLA
reads its flags once, when the backend starts. Every rank sends half of its `--rows` bf16
rows of width `--d` to each rank: the defaults are the MoHGE-3B layer's forward exchange
at 32 x 4096 tokens per GPU, top-6, on two GPUs. A dense `jax.lax.all_to_all` of the same
rows is the yardstick, and the ragged result must equal it bitwise. Prints one JSON line
per kind: median ms of 10 (after one warm-up), and whether the results were equal.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def measure(rows: int, d: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import PartitionSpec as P

  n = jax.device_count()
  mesh = jax.make_mesh((n,), ("e",))
  chunk = rows // n

  def ragged(x):  # rank r's block j goes to rank j, lands at r * chunk there
    out = jnp.zeros_like(x) + 0 * x[0, 0]  # data-dependent buffer (collectives._lax_exchange)
    r = jax.lax.axis_index("e")
    sizes = jnp.full((n,), chunk, jnp.int32)
    return jax.lax.ragged_all_to_all(x, out, jnp.arange(n, dtype=jnp.int32) * chunk, sizes,
                                     jnp.full((n,), r * chunk, jnp.int32), sizes,
                                     axis_name="e")

  def dense(x):
    return jax.lax.all_to_all(x, "e", 0, 0, tiled=True)

  x = jax.device_put(
      jnp.asarray(np.random.default_rng(0).standard_normal((chunk * n * n, d)), jnp.bfloat16),
      jax.NamedSharding(mesh, P("e")))
  out, got = {}, {}
  for name, f in (("ragged", ragged), ("dense", dense)):
    g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("e"), out_specs=P("e")))
    got[name] = g(x).block_until_ready()
    times = []
    for _ in range(10):
      t = time.perf_counter()
      g(x).block_until_ready()
      times.append(time.perf_counter() - t)
    out[f"{name}_ms"] = 1e3 * sorted(times)[len(times) // 2]
  out["equal"] = bool(jnp.array_equal(got["ragged"], got["dense"]))
  out["gb_per_rank"] = chunk * n * d * 2 / 1e9
  return out


def main() -> None:
  from mohge_jax.collectives import GPU_A2A_FLAGS
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--rows", type=int, default=786432, help="rows per rank")
  ap.add_argument("--d", type=int, default=1024)
  ap.add_argument("--kinds", default=",".join(GPU_A2A_FLAGS))
  ap.add_argument("--timeout", type=float, default=120, help="seconds per kind")
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a.child:
    print(json.dumps(measure(a.rows, a.d)), flush=True)
    return
  for kind in a.kinds.split(","):
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "ragged_all_to_all" not in f]
    env = dict(os.environ, XLA_FLAGS=" ".join(flags + list(GPU_A2A_FLAGS[kind])))
    try:
      p = subprocess.run([sys.executable, "-m", "benchmarks.ragged_a2a_probe", "--child",
                          "--rows", str(a.rows), "--d", str(a.d)], env=env,
                         capture_output=True, text=True, timeout=a.timeout)
      lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
      row = json.loads(lines[-1]) if lines else {"error": p.stderr[-800:]}
    except subprocess.TimeoutExpired:
      row = {"error": f"over {a.timeout:.0f} s"}
    print(json.dumps({"kind": kind, **row}), flush=True)


if __name__ == "__main__":
  main()
