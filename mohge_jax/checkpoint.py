"""Checkpointing: one orbax CheckpointManager step = an array pytree + a JSON meta dict.

  ckpt = Checkpointer(workdir / "checkpoints", keep=3)
  ckpt.save(step, {"params": params, "opt": opt_state}, {"data_pos": 1234, "config": cfg})
  state, meta = ckpt.restore(None, abstract_state)   # None: latest complete step

`state` is any pytree of jax arrays (dicts, lists, tuples, namedtuples, optax states,
`nnx.State` as returned by `nnx.split`). An `nnx.State` round-trips as an `nnx.State`;
its variables are stored under a trailing `value` key (`model/a/kernel/value`), so a
checkpoint saved from an `nnx.State` must be restored into an `nnx.State` target, and
one saved from `nnx.to_pure_dict(state)` into a pure-dict target.

Crash safety is orbax's: a step is written to `<step>.orbax-checkpoint-tmp` and renamed
to `<step>` only once complete, old steps are deleted only after that, and only renamed
steps are ever listed. Opening a Checkpointer removes such unfinished directories, so
use one writing Checkpointer per directory.
"""

import json
import tempfile
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

PyTree = Any


class CheckpointError(Exception):
  """A checkpoint cannot be written or found, or does not match the model/config."""


class Checkpointer:
  """Saves and restores (state, meta) pairs as steps of `directory`."""

  def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}")
    self.directory = Path(directory).absolute()
    # Probe now, so a bad path fails at start-up rather than in a background save thread.
    try:
      self.directory.mkdir(parents=True, exist_ok=True)
      tempfile.TemporaryFile(dir=self.directory).close()
    except OSError as e:
      raise CheckpointError(
        f"cannot create or write checkpoint directory {self.directory}: {e}"
      ) from e
    options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.LatestN(keep),  # = max_to_keep
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,
    )
    self._mgr = ocp.CheckpointManager(
      self.directory,
      options=options,
      item_handlers={
        "state": ocp.StandardCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
      },
    )

  def save(self, step: int, state: PyTree, meta: dict[str, Any]) -> bool:
    """Saves `state` and `meta` as `step`; False (and no save) if that step exists.

    Saves whenever asked: the caller decides when (every N steps, on SIGTERM). With
    async_save the arrays are copied off the devices before this returns and written
    in the background; `wait()` blocks until the checkpoint is durable.
    """
    if step in self._mgr.all_steps():  # includes a save of `step` still in flight
      return False
    try:
      json.dumps(meta)  # fail here, not in orbax's background thread
    except (TypeError, ValueError) as e:
      raise CheckpointError(f"meta for step {step} is not JSON-serialisable: {e}") from e
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    # force: skip orbax's save-interval policy, which also refuses steps < latest.
    return self._mgr.save(step, args=args, force=True)

  def wait(self) -> None:
    """Blocks until the save in flight (if any) is complete on disk."""
    self._mgr.wait_until_finished()

  def all_steps(self) -> list[int]:
    """Steps with a complete checkpoint, oldest first (waits for a save in flight)."""
    # Orbax lists a step as soon as its save starts; wait so it is listed only when durable.
    self.wait()
    return sorted(self._mgr.all_steps())

  def latest_step(self) -> int | None:
    """Newest complete step, or None if there is none (waits for a save in flight)."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def restore(self, step: int | None, target: PyTree) -> tuple[PyTree, dict[str, Any]]:
    """Restores `step` (None: latest) into `target`'s structure, shapes, dtypes, shardings.

    `target` is a pytree of `jax.ShapeDtypeStruct` (with `.sharding` on the current
    mesh) or of arrays; restoring onto another mesh or device count is passing shardings
    for the current one. Dtypes are cast to the target's. Raises CheckpointError if
    there is no such checkpoint or its structure or shapes differ from `target`.
    """
    step = self._existing_step(step)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    self._check_matches(step, abstract)
    args = ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
    )
    restored = self._mgr.restore(step, args=args)
    return restored.state, restored.meta

  def restore_meta(self, step: int | None = None) -> dict[str, Any]:
    """Reads only the meta dict of `step` (None: latest); raises CheckpointError if none."""
    step = self._existing_step(step)
    return self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def close(self) -> None:
    """Waits for the save in flight, then releases orbax's threads."""
    self._mgr.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()

  def _existing_step(self, step: int | None) -> int:
    steps = self.all_steps()
    if not steps:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    if step is None:
      return steps[-1]
    if step not in steps:
      raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; have {steps}")
    return step

  def _check_matches(self, step: int, abstract: PyTree, shown: int = 8) -> None:
    """Compares saved and wanted leaves by path, in place of orbax's deep errors."""
    saved_tree = self._mgr.item_metadata(step)["state"]
    saved = {k: tuple(v.shape) for k, v in ocp.tree.to_flat_dict(saved_tree, sep="/").items()}
    wanted = {k: _stored_shape(v) for k, v in ocp.tree.to_flat_dict(abstract, sep="/").items()}
    problems = sorted(
      [f"{k}: not in checkpoint" for k in wanted.keys() - saved.keys()]
      + [f"{k}: in checkpoint, not in target" for k in saved.keys() - wanted.keys()]
      + [
        f"{k}: checkpoint shape {saved[k]}, target shape {wanted[k]}"
        for k in wanted.keys() & saved.keys()
        if saved[k] != wanted[k]
      ]
    )
    if problems:
      more = f"\n  ... and {len(problems) - shown} more" if len(problems) > shown else ""
      raise CheckpointError(
        f"checkpoint {self.directory / str(step)} does not match the current "
        f"model/config ({len(problems)} mismatched leaves):\n  "
        + "\n  ".join(problems[:shown])
        + more
      )


def _stored_shape(x: jax.ShapeDtypeStruct) -> tuple[int, ...]:
  """The shape orbax stores: typed PRNG keys (e.g. nnx.Rngs state) as their key data."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.eval_shape(jax.random.key_data, x).shape
  return tuple(x.shape)
