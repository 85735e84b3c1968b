"""Work lists built at run time from the (traced) group sizes.

A *row item* is one (expert, row tile) pair: the rows of one expert that fall into one
tile of `tm` rows of the global row axis. Items are listed expert by expert, tiles in
order, so items that share a tile are neighbours. The rows past sum(group_sizes) form
one more pseudo-expert (index E, group G): its items exist so that kernels can write
zeros there. Every array has a static length (a bound), entries past `num_items` repeat
the last item.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def cdiv(a, b):
  return -(-a // b)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RowItems:
  expert: jax.Array     # [T] global expert index (E for the padding pseudo-expert)
  group: jax.Array      # [T] group index (G for padding)
  local: jax.Array      # [T] expert index within its group (0 for padding)
  tile: jax.Array       # [T] row tile index
  row_start: jax.Array  # [T] first row of the item (global)
  row_end: jax.Array    # [T] one past its last row
  first: jax.Array      # [T] 1 where the item is its expert's first
  last: jax.Array       # [T] 1 where the item is its expert's last
  num_items: jax.Array  # [] number of real items

  @property
  def bound(self):
    return self.tile.shape[0]


def row_items(group_sizes_E, m, tm, num_groups, *, include_empty, include_padding):
  """Row items for `m` rows in tiles of `tm`.

  include_empty: give each expert without rows one empty item (kernels that must write
  something per expert, like the weight gradient, need it). include_padding: add the
  items of the padding pseudo-expert.
  """
  e = group_sizes_E.shape[0]
  n = e // num_groups
  num_tiles = cdiv(m, tm)
  sizes = group_sizes_E.astype(jnp.int32)
  total = jnp.sum(sizes)
  sizes = jnp.concatenate([sizes, (m - total)[None]])           # [E + 1]
  ends = jnp.cumsum(sizes)
  starts = ends - sizes
  first_tile = jnp.minimum(starts // tm, num_tiles - 1)
  last_tile = jnp.where(sizes > 0, (ends - 1) // tm, first_tile)
  count = jnp.where(sizes > 0, last_tile - first_tile + 1, 1 if include_empty else 0)
  if not include_padding:
    count = count.at[e].set(0)
  else:  # padding items only when there are padding rows
    count = count.at[e].set(jnp.where(sizes[e] > 0, count[e], 0))
  offsets_end = jnp.cumsum(count)
  offsets = offsets_end - count
  num_items = offsets_end[-1]
  bound = num_tiles + 2 * e + 2
  t = jnp.minimum(jnp.arange(bound, dtype=jnp.int32), jnp.maximum(num_items - 1, 0))
  expert = jnp.searchsorted(offsets_end, t, side="right").astype(jnp.int32)
  expert = jnp.minimum(expert, e)
  tile = first_tile[expert] + (t - offsets[expert])
  row_start = jnp.clip(starts[expert], tile * tm, (tile + 1) * tm)
  row_end = jnp.clip(ends[expert], tile * tm, (tile + 1) * tm)
  row_end = jnp.maximum(row_end, row_start)
  return RowItems(
      expert=expert,
      group=jnp.where(expert == e, num_groups, expert // n).astype(jnp.int32),
      local=jnp.where(expert == e, 0, expert % n).astype(jnp.int32),
      tile=tile.astype(jnp.int32),
      row_start=row_start.astype(jnp.int32),
      row_end=row_end.astype(jnp.int32),
      first=(t == offsets[expert]).astype(jnp.int32),
      last=(t == offsets_end[expert] - 1).astype(jnp.int32),
      num_items=num_items.astype(jnp.int32),
  )


def split_block(idx, half_blocks, max_half_blocks):
  """Logical block idx of a gate ‖ up axis (half_blocks each) → split-layout block."""
  return jnp.where(idx < half_blocks, idx, idx - half_blocks + max_half_blocks)


def split_block_inverse(p, half_blocks, max_half_blocks):
  """Split-layout block p → (logical block, valid) for a group of half_blocks blocks."""
  in_gate = p < max_half_blocks
  logical = jnp.where(in_gate, p, p - max_half_blocks + half_blocks)
  valid = jnp.where(in_gate, p < half_blocks, p - max_half_blocks < half_blocks)
  return logical, valid
