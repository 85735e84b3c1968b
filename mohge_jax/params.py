"""Parameter counts: `python -m mohge_jax.params CONFIG [key=value ...]` prints JSON.

Counts come from the model's real parameter shapes (built abstractly, nothing allocated).
`activated` is per token: every parameter a token touches, with routed experts counted at
their expected size under uniform routing (K experts of the mean group width per routed
layer) and the embedding counted whole (as is customary, although a token reads one row).
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
from flax import nnx

from mohge_jax.config import Config, load_config
from mohge_jax.model import Transformer

COMPONENTS = ("embedding", "attention", "dense_ffn", "shared_experts", "routed_experts",
              "router", "norms", "head")


def component_of(path: tuple) -> str:
  keys = [str(k) for k in path]
  if keys[0] == "embed":
    return "embedding"
  if keys[0] == "head":
    return "head"
  if keys[-1] == "scale" and keys[-2] in ("attn_norm", "ffn_norm", "final_norm"):
    return "norms"
  if "attn" in keys:
    return "attention"
  if "shared" in keys:
    return "shared_experts"
  if keys[-1] in ("group_router", "expert_router"):
    return "router"
  if "w_gate_up" in keys[-2:] or "w_down" in keys[-2:]:
    return "routed_experts" if isinstance(path[-1], int) else "dense_ffn"
  raise ValueError(f"unclassified parameter {'/'.join(keys)}")


def abstract_params(cfg: Config) -> nnx.State:
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  return nnx.state(model, nnx.Param)


def count(cfg: Config) -> dict:
  by_component = dict.fromkeys(COMPONENTS, 0)
  for path, leaf in nnx.to_flat_state(abstract_params(cfg)):
    by_component[component_of(path)] += int(np.prod(leaf.shape))
  m = cfg.model
  total = sum(by_component.values())
  routed_layers = sum(k in ("mohge", "moe") for k in m.ffn_kinds)
  mean_width = float(np.mean(m.group_widths))
  routed_active = routed_layers * m.top_k * 3 * m.d_model * mean_width
  activated = total - by_component["routed_experts"] + routed_active
  return {
      "total": total,
      "activated": int(round(activated)),
      "activated_note": ("per token; routed experts at their expected size under uniform "
                         f"routing: {routed_layers} routed layers x top_k={m.top_k} x "
                         f"3*d*mean_width ({mean_width:g}); embedding counted whole"),
      "breakdown": by_component,
      "routed_experts_activated": int(round(routed_active)),
  }


def main(argv: list[str]) -> None:
  if not argv or argv[0] in ("-h", "--help"):
    print(__doc__)
    sys.exit(0 if argv else 2)
  cfg = load_config(argv[0], argv[1:])
  print(json.dumps({"config": argv[0], **count(cfg)}, indent=2))


if __name__ == "__main__":
  jax.config.update("jax_platforms", "cpu")
  main(sys.argv[1:])
