"""Device mesh and the one mapping from logical axes to mesh axes.

Every parameter has logical axis names (by its name in the model); `RULES` maps each logical
axis to mesh axes; `logical_to_physical` turns them into a PartitionSpec, dropping a mesh
axis that does not divide the dimension or that an earlier dimension already uses. Trying
another sharding is editing `RULES`.

    mesh = make_mesh(cfg.mesh)
    shardings = state_shardings(abstract_state, mesh)
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mohge_jax.config import ConfigError, MeshConfig

AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")  # the batch is split over all but tensor

# Logical axis -> mesh axes.
RULES: dict[str, tuple[str, ...]] = {
    "batch": BATCH_AXES,
    "embed": ("fsdp",),  # model width of weights: FSDP
    "vocab": ("tensor",),
    "heads": ("tensor",),  # fused (heads x head_dim) projections
    "ffn": ("tensor",),  # dense / shared FFN width
    "experts": ("expert",),  # the N experts of a group
    "expert_ffn": (),
    "latent": (),
    "router": (),
    "norm": (),
    "layers": (),  # the leading axis of a stack of scanned layers: never sharded
}

# Parameter name -> logical axes (by the last names of its path in the model).
PARAM_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"),
    "head": ("embed", "vocab"),
    "scale": ("norm",),
    "w_q": ("embed", "heads"),
    "w_dq": ("embed", "latent"),
    "w_uq": ("latent", "heads"),
    "w_dkv": ("embed", "latent"),
    "w_ukv": ("latent", "heads"),
    "w_kv": ("embed", "heads"),
    "w_o": ("heads", "embed"),
    "group_router": ("embed", "router"),
    "expert_router": ("embed", "router"),
    "dense.w_gate_up": ("embed", "ffn"),
    "dense.w_down": ("ffn", "embed"),
    "expert.w_gate_up": ("experts", "embed", "expert_ffn"),
    "expert.w_down": ("experts", "expert_ffn", "embed"),
}


def mesh_shape(m: MeshConfig, num_devices: int) -> dict[str, int]:
  sizes = {k: getattr(m, k) for k in AXES}
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if -1 in sizes.values():
    if num_devices % fixed:
      raise ConfigError(f"mesh: {num_devices} devices cannot be split with "
                        f"{', '.join(f'{k}={v}' for k, v in sizes.items() if v != -1)}")
    sizes = {k: (num_devices // fixed if v == -1 else v) for k, v in sizes.items()}
  if math.prod(sizes.values()) != num_devices:
    raise ConfigError(
        f"mesh data x fsdp x expert x tensor = {' x '.join(str(sizes[k]) for k in AXES)} = "
        f"{math.prod(sizes.values())} does not match the {num_devices} devices; set one "
        "axis to -1 to take the rest")
  return sizes


def make_mesh(m: MeshConfig, devices: list | None = None) -> Mesh:
  devices = devices if devices is not None else jax.devices()
  sizes = mesh_shape(m, len(devices))
  return jax.make_mesh(tuple(sizes[k] for k in AXES), AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def logical_to_physical(logical: tuple[str | None, ...], shape: tuple[int, ...],
                        mesh: Mesh) -> P:
  used: set[str] = set()
  spec = []
  for name, dim in zip(logical, shape):
    axes = [a for a in RULES.get(name, ()) if a not in used and mesh.shape[a] > 1] if name else []
    while axes and dim % math.prod(mesh.shape[a] for a in axes):
      axes.pop()  # drop what does not divide the dimension
    used.update(axes)
    spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
  return P(*spec)


def _key_name(k: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def param_logical_axes(path: tuple, ndim: int) -> tuple[str | None, ...]:
  """Logical axes of a parameter (or of an optimizer-state leaf that mirrors one).
  Parameters of a stack of scanned layers (`stacks/<i>/layers/...`) have a leading
  "layers" axis."""
  names = [_key_name(k) for k in path if _key_name(k) != "value"]
  if "layers" in names:
    return ("layers",) + _unstacked_axes(names, ndim - 1)
  return _unstacked_axes(names, ndim)


def _unstacked_axes(names: list[str], ndim: int) -> tuple[str | None, ...]:
  for i in range(len(names) - 1, -1, -1):
    name = names[i]
    if name in ("w_gate_up", "w_down"):
      kind = "expert" if i + 1 < len(names) and names[i + 1].isdigit() else "dense"
      axes = PARAM_AXES[f"{kind}.{name}"]
    elif name in PARAM_AXES:
      axes = PARAM_AXES[name]
    else:
      continue
    return axes if len(axes) == ndim else (None,) * ndim
  return (None,) * ndim


def state_shardings(abstract: Any, mesh: Mesh) -> Any:
  """NamedShardings for a pytree of arrays/ShapeDtypeStructs: parameters and whatever
  mirrors them (optimizer moments) by their names; everything else replicated."""
  def one(path, leaf):
    shape = tuple(getattr(leaf, "shape", ()))
    axes = param_logical_axes(path, len(shape))
    return NamedSharding(mesh, logical_to_physical(axes, shape, mesh))
  return jax.tree_util.tree_map_with_path(one, abstract)


def batch_sharding(mesh: Mesh, leading: int = 1) -> NamedSharding:
  """Batch arrays [leading dims..., B, L]: B over the batch axes."""
  return NamedSharding(mesh, P(*([None] * leading), BATCH_AXES))


def batch_size_divides(batch: int, mesh: Mesh) -> bool:
  return batch % int(np.prod([mesh.shape[a] for a in BATCH_AXES])) == 0
