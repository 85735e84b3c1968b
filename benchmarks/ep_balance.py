"""Per-device balance of the paper's MoHGE-3B expert layer at expert-parallel 8: the
All-size Group-decoupling Allocation against the naive one (whole groups per device).

    python -m benchmarks.ep_balance [--tokens 32768] [--out FILE.json]

Runs on 8 fake CPU devices (sets XLA_FLAGS itself). Parameters per device are read from
the sharded arrays (all_size) and from `allocation` (naive); token-expert pairs and routed
FLOPs per device come from routing a batch through the real layer (random router at
initialisation, random hidden states), through `allocation.balance_report`.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from mohge_jax import allocation, sharding  # noqa: E402
from mohge_jax.config import load_config  # noqa: E402
from mohge_jax.experts import RoutedFFN  # noqa: E402


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--tokens", type=int, default=32768)
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  cfg = load_config("configs/mohge_3b.yaml", ["mesh.expert=8", "model.dtype=float32",
                                              "model.expert_backend=tiled"])
  m = cfg.model
  mesh = sharding.make_mesh(cfg.mesh)
  layer = RoutedFFN(cfg, "mohge", rngs=nnx.Rngs(0))
  params = nnx.state(layer, nnx.Param)
  sharded = jax.device_put(params, sharding.state_shardings(params, mesh))
  experts = [w for path, w in nnx.to_flat_state(sharded) if str(path[0]) in ("w_gate_up", "w_down")]
  per_device = {d: 0 for d in mesh.devices.flat}
  for w in experts:
    for shard in w[...].addressable_shards:
      per_device[shard.device] += shard.data.size
  measured_params = [per_device[d] for d in mesh.devices.flat]

  x = jnp.asarray(np.random.default_rng(0).normal(size=(args.tokens, m.d_model)), jnp.float32)
  _, aux = jax.jit(lambda x: layer.route(x))(x)
  tokens_1xE = np.asarray(aux["expert_tokens"])[None]
  report = {"config": "configs/mohge_3b.yaml (one MoHGE layer)", "ep": 8, "tokens": args.tokens,
            "devices": len(mesh.devices.flat)}
  for strategy in ("all_size", "naive"):
    p = allocation.place(m.group_widths, m.experts_per_group, 8, strategy)
    bal = allocation.balance_report(tokens_1xE, m.group_widths, m.experts_per_group, 8,
                                    m.d_model, strategy)
    params_r = allocation.rank_params(p, m.group_widths, m.experts_per_group, m.d_model)
    report[strategy] = {
        "params_per_rank": params_r.tolist(),
        "param_imbalance": allocation.imbalance(params_r),
        "pairs_per_rank": bal["rank_tokens"], "pair_imbalance": bal["token_imbalance"][0],
        "flops_per_rank": bal["rank_flops"], "flop_imbalance": bal["flop_imbalance"][0],
    }
  report["all_size"]["params_per_rank_measured"] = measured_params
  assert measured_params == report["all_size"]["params_per_rank"], "sharding != allocation"

  print(f"MoHGE-3B expert layer, EP=8 on {report['devices']} devices, {args.tokens} tokens:")
  print(f"{'placement':<10}{'params/rank (M)':>28}{'max/mean':>10}{'pairs max/mean':>16}"
        f"{'FLOPs max/mean':>16}")
  for s in ("all_size", "naive"):
    r = report[s]
    lo, hi = min(r["params_per_rank"]) / 1e6, max(r["params_per_rank"]) / 1e6
    print(f"{s:<10}{f'{lo:.2f} .. {hi:.2f}':>28}{r['param_imbalance']:>10.3f}"
          f"{r['pair_imbalance']:>16.3f}{r['flop_imbalance']:>16.3f}")
  if args.out:
    with open(args.out, "w") as fh:
      json.dump(report, fh, indent=1)


if __name__ == "__main__":
  main()
