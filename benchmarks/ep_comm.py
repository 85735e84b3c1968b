"""Communication of the expert-parallel MoHGE layer: bytes per rank per training step,
read from the compiled program, against the theoretical minimum.

    python -m benchmarks.ep_comm [--tokens-per-rank 1024] [--out FILE.json]

Runs on 8 fake CPU devices (sets XLA_FLAGS itself): the paper's MoHGE-3B layer (d=1024,
8 groups x 8 experts of widths 384..1280, Kg=4, K=6), expert-parallel 8, bf16 activations,
forward+backward. For each exchange it lists the collectives of the program with their
static buffer sizes, and the bytes that actually move for a random routing:
- all_to_all: ragged all-to-all of rows (lowered with jax.lax.ragged_all_to_all, which
  XLA:CPU cannot compile, so its sizes come from the lowered program; the bytes that move
  are the rows whose expert lives on another rank, counted from the routing);
- all_gather: all-gather of tokens + reduce-scatter of partial outputs (compiled here).
Theoretical minimum per rank: every token-expert pair whose expert is elsewhere crosses
the network once forward (x) and once back (y), and again in the backward pass (dy, dx):
4 * rows_remote * d * 2 bytes.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mohge_jax import expert_parallel, routing, sharding  # noqa: E402
from mohge_jax.config import MeshConfig  # noqa: E402

D, G, N, KG, K, EP = 1024, 8, 8, 4, 6, 8
WIDTHS = tuple(range(384, 1281, 128))
COLLECTIVE = re.compile(r"=\s*(\S+)\s+(all-to-all|ragged-all-to-all|all-gather|reduce-scatter|"
                        r"all-reduce|collective-permute)\(")
SHAPE = re.compile(r"(bf16|f32|s32|u32|f16|s8|u8|pred)\[([\d,]*)\]")
BYTES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1}


def shape_bytes(text: str) -> int:
  total = 0
  for dtype, dims in SHAPE.findall(text):
    total += BYTES[dtype] * int(np.prod([int(x) for x in dims.split(",") if x] or [1]))
  return total


def collectives(hlo: str) -> list[dict]:
  out = []
  for line in hlo.splitlines():
    m = COLLECTIVE.search(line)
    if m:
      out.append({"op": m.group(2), "result_bytes": shape_bytes(m.group(1))})
  return out


def stablehlo_collectives(text: str) -> list[dict]:
  out = []
  for line in text.splitlines():
    for op in ("ragged_all_to_all", "all_to_all", "all_gather", "reduce_scatter", "all_reduce"):
      if f"@{op}(" in line or f"stablehlo.{op}\"" in line:
        types = re.findall(r"tensor<([\dx]+)x(bf16|f32|i32)>", line.split("->")[-1])
        size = sum(BYTES[{"i32": "s32"}.get(t, t)] * int(np.prod([int(x) for x in d.split("x")]))
                   for d, t in types)
        out.append({"op": op, "result_bytes": size})
        break
  return out


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--tokens-per-rank", type=int, default=1024)
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  T = args.tokens_per_rank * EP
  rng = np.random.default_rng(0)
  mesh = sharding.make_mesh(MeshConfig(data=1, expert=EP))
  x = jnp.asarray(rng.normal(size=(T, D)), jnp.bfloat16)
  u = jnp.asarray(rng.normal(size=(T, G)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(T, G * N)), jnp.float32)
  r = routing.two_level_route(u, v, num_groups=G, top_k_groups=KG, top_k=K)
  wgu = [jnp.asarray(rng.normal(size=(N, D, 2 * w)) * 0.02, jnp.bfloat16) for w in WIDTHS]
  wd = [jnp.asarray(rng.normal(size=(N, w, D)) * 0.02, jnp.bfloat16) for w in WIDTHS]

  # What must move: pairs whose expert lives on another rank (tokens are rank-contiguous).
  owner, _ = expert_parallel._owner_and_local(np.asarray(r.expert_ids), experts_per_group=N,
                                              ep=EP)
  token_rank = np.repeat(np.arange(EP), T // EP)[:, None]
  remote_rows = (owner != token_rank).sum() / EP
  minimum = 4 * remote_rows * D * 2
  report = {"config": "MoHGE-3B layer", "ep": EP, "tokens_per_rank": T // EP, "top_k": K,
            "remote_rows_per_rank": float(remote_rows),
            "theoretical_min_bytes_per_rank": float(minimum), "exchanges": {}}

  for comm in ("all_to_all", "all_gather"):
    def loss(x, wgu, wd, comm=comm):
      y = expert_parallel.routed_experts(x, r.expert_ids, r.weights, wgu, wd, mesh=mesh,
                                         experts_per_group=N, comm=comm, backend="tiled",
                                         a2a_impl="lax")
      return jnp.sum(y * y)
    f = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    with jax.set_mesh(mesh):
      lowered = f.lower(x, wgu, wd)
      if comm == "all_gather":
        ops = collectives(lowered.compile().as_text())
      else:
        ops = stablehlo_collectives(lowered.as_text())
    static = sum(o["result_bytes"] for o in ops)
    if comm == "all_to_all":
      # ragged exchanges move only the rows they are told to; the four big ones carry
      # the remote rows (dispatch, return, and their transposes in the backward pass).
      moved = minimum + sum(o["result_bytes"] for o in ops if o["op"] == "all_to_all")
    else:
      # all-gather / reduce-scatter: a rank receives (EP-1)/EP of each result buffer.
      moved = sum(o["result_bytes"] * (EP - 1) / EP for o in ops
                  if o["op"] in ("all-gather", "reduce-scatter", "all-to-all"))
    report["exchanges"][comm] = {
        "collectives": ops, "static_buffer_bytes": static, "bytes_moved_per_rank": moved,
        "vs_minimum": moved / minimum}
  print(f"MoHGE-3B layer, EP={EP}, {T // EP} tokens/rank, K={K}: remote rows/rank "
        f"{remote_rows:,.0f}; theoretical minimum {minimum / 2**20:,.1f} MiB/rank (fwd+bwd)")
  print(f"{'exchange':<12}{'collectives':>12}{'static MiB':>12}{'moved MiB':>12}{'x minimum':>11}")
  for comm, e in report["exchanges"].items():
    print(f"{comm:<12}{len(e['collectives']):>12}{e['static_buffer_bytes'] / 2**20:>12.1f}"
          f"{e['bytes_moved_per_rank'] / 2**20:>12.1f}{e['vs_minimum']:>11.2f}")
  if args.out:
    with open(args.out, "w") as fh:
      json.dump(report, fh, indent=1)


if __name__ == "__main__":
  main()
