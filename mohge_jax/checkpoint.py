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

Damage after the commit (bit rot, a partial write on a network filesystem, a full disk, a
file deleted by hand) is detected: every step carries `integrity.json`, the size and sha256
of each of its files, written after all processes finished writing and before the rename
that commits the step (so a listed step always has one). `restore` and `restore_meta`
verify the files before reading them and raise CheckpointDamaged naming the file;
`resume_step` moves damaged steps aside to `<step>.damaged-<time>` (renamed, never
deleted; orbax neither lists nor removes them) and returns the newest intact one.

    python -m mohge_jax.checkpoint verify WORKDIR   # each checkpoint: intact or damaged
"""

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from mohge_jax import integrity

PyTree = Any


class CheckpointError(Exception):
  """A checkpoint cannot be written or found, or does not match the model/config."""


class CheckpointDamaged(CheckpointError):
  """A checkpoint's files are not those written: changed, truncated, missing, unreadable."""


class _SealingRename(ocp.path.atomicity.AtomicRenameTemporaryPath):
  """orbax's commit by atomic rename, with the integrity manifest written just before it.

  orbax calls `finalize` of the step's temporary path once, on the primary process, after
  every process has finished writing and the handlers have finalized their items (OCDBT
  merged its per-process indices), for synchronous and asynchronous saves alike. Writing
  the manifest there puts it inside the same atomic commit as the arrays: a crash before
  the rename leaves an unfinished directory that orbax never lists and removes, one after
  leaves a complete, sealed step. (The items' own temporary paths, `state` and `meta`, use
  this class too; only the step directory, named by its number, gets a manifest.) orbax's
  `post_finalization_callback` would run at the same point but is told neither the
  directory nor the step, and exists only for asynchronous saves.
  """

  async def finalize(self):
    if self.get_final().name.isdigit():
      await asyncio.to_thread(integrity.write_manifest, self.get())
    await super().finalize()


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
      temporary_path_class=_SealingRename,  # deprecated in favour of atomicity_options,
    )                                       # which offers only orbax's own classes
    self._mgr = ocp.CheckpointManager(
      self.directory,
      options=options,
      item_handlers={
        "state": ocp.StandardCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
      },
    )
    self._intact: set[int] = set()  # steps verified by this Checkpointer

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
    there is no such checkpoint or its structure or shapes differ from `target`, and
    CheckpointDamaged if its files are not those written (checked before reading them:
    orbax would return changed values or fail naming no file).
    """
    step = self._existing_step(step)
    self._check_intact(step)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    self._check_matches(step, abstract)
    args = ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
    )
    restored = self._mgr.restore(step, args=args)
    return restored.state, restored.meta

  def restore_meta(self, step: int | None = None) -> dict[str, Any]:
    """Reads only the meta dict of `step` (None: latest); raises CheckpointError if none,
    CheckpointDamaged if the step fails verification."""
    step = self._existing_step(step)
    self._check_intact(step)
    return self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def step_dir(self, step: int) -> Path:
    return self.directory / str(step)

  def verify(self, step: int, *, recheck: bool = False) -> str | None:
    """None if the files of `step` are those written (its manifest's sizes and checksums),
    else what is wrong. Reads every file once; a step found intact is not read again by
    this Checkpointer unless `recheck`. With several processes, process 0 reads the files
    and tells the others (all must call this together)."""
    if step in self._intact and not recheck:
      return None
    problem = integrity.verify_manifest(self.step_dir(step)) if jax.process_index() == 0 else None
    problem = _from_process_0(problem)
    if problem is None:
      self._intact.add(step)
    return problem

  def newest_intact_step(self, *, recheck: bool = False) -> tuple[int | None, dict[int, str]]:
    """The newest step that verifies (None if none does), and what is wrong with each
    newer step, newest first. Reads only as far back as the first intact step."""
    damaged = {}
    for step in reversed(self.all_steps()):
      problem = self.verify(step, recheck=recheck)
      if problem is None:
        return step, damaged
      damaged[step] = problem
    return None, damaged

  def resume_step(self, log: Callable[[str], None] = print) -> int | None:
    """The step to resume from: the newest intact one, None if there is no checkpoint.

    Damaged newer steps are reported (`log`) and moved aside. If there are checkpoints but
    none is intact, raises CheckpointDamaged listing them and touches nothing: starting
    afresh would silently throw the run away.
    """
    step, damaged = self.newest_intact_step()
    if step is None and damaged:
      raise CheckpointDamaged(
        f"no intact checkpoint in {self.directory}; nothing was moved or deleted:\n  "
        + "\n  ".join(f"{self.step_dir(s)}: {problem}" for s, problem in damaged.items())
        + "\nRestore the directory from a backup, or move it away to start from scratch."
      )
    for s, problem in damaged.items():
      moved = self.move_aside(s)
      log(f"checkpoint {self.step_dir(s)} is damaged: {problem}. Moved it aside to {moved}.")
    return step

  def move_aside(self, step: int) -> Path:
    """Renames `step` to `<step>.damaged-<UTC time>` (kept for inspection; orbax neither lists
    nor deletes it) and forgets it. All processes call this; process 0 renames."""
    self.wait()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = self.directory / f"{step}.damaged-{stamp}"
    for n in range(1, 1000):
      if not aside.exists():
        break
      aside = self.directory / f"{step}.damaged-{stamp}-{n}"
    if jax.process_index() == 0:
      try:
        self.step_dir(step).rename(aside)
      except OSError as e:
        raise CheckpointError(f"cannot move damaged checkpoint {self.step_dir(step)} aside to "
                              f"{aside}: {e.strerror or e}") from e
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"mohge_checkpoint_move_aside_{step}")
    self._intact.discard(step)
    self._mgr.reload()
    return aside

  def close(self) -> None:
    """Waits for the save in flight, then releases orbax's threads."""
    self._mgr.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()

  def _check_intact(self, step: int) -> None:
    problem = self.verify(step)
    if problem:
      raise CheckpointDamaged(f"checkpoint {self.step_dir(step)} is damaged: {problem}")

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


def _from_process_0(problem: str | None) -> str | None:
  """Process 0's verdict on every process (only it read the files)."""
  if jax.process_count() == 1:
    return problem
  from jax.experimental import multihost_utils
  damaged = multihost_utils.broadcast_one_to_all(np.int32(problem is not None))
  return (problem or "damaged (process 0 logged what is wrong)") if int(damaged) else None


# ----------------------------------------------------------------------------- verify CLI


def _step_dirs(directory: Path) -> tuple[list[int], list[str]]:
  """(the committed steps, oldest first; the names of moved-aside or unfinished ones)."""
  steps, others = [], []
  for p in directory.iterdir():
    if p.is_dir() and p.name.isdigit():
      steps.append(int(p.name))
    elif p.is_dir() and (".damaged-" in p.name or ".orbax-checkpoint-tmp" in p.name):
      others.append(p.name)
  return sorted(steps), sorted(others)


def verify_cli(workdir: str | Path) -> int:
  """Lists each checkpoint of `workdir` (or of a checkpoints directory) as intact or damaged.
  Reads only. 0: the newest is intact; 1: the newest is damaged; 2: no checkpoints."""
  workdir = Path(workdir)
  directory = workdir / "checkpoints" if (workdir / "checkpoints").is_dir() else workdir
  steps, others = _step_dirs(directory) if directory.is_dir() else ([], [])
  if not steps:
    print(f"error: no checkpoints in {directory}", file=sys.stderr)
    return 2
  print(f"checkpoints in {directory}:")
  problems = {}
  for step in steps:
    problems[step] = integrity.verify_manifest(directory / str(step))
    print(f"  step {step}: " + (f"DAMAGED: {problems[step]}" if problems[step] else "intact"))
  for name in others:
    why = "moved aside as damaged" if ".damaged-" in name else "unfinished save, never listed"
    print(f"  {name}: {why} (not checked)")
  newest = steps[-1]
  if not problems[newest]:
    return 0
  intact = [s for s in steps if not problems[s]]
  if intact:
    print(f"the newest checkpoint, step {newest}, is damaged: resuming moves the damaged steps "
          f"newer than step {intact[-1]} aside and starts from step {intact[-1]}")
  else:
    print("no checkpoint is intact: resuming stops and touches nothing")
  return 1


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog="python -m mohge_jax.checkpoint",
                              description="Checks training checkpoints.")
  sub = p.add_subparsers(dest="command", required=True)
  v = sub.add_parser("verify", help="list each checkpoint as intact or damaged (exit status "
                     "1 if the newest is damaged, 2 if there is none)")
  v.add_argument("workdir", help="a training workdir, or its checkpoints/ directory")
  args = p.parse_args(argv)
  return verify_cli(args.workdir)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
