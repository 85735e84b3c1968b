"""Checksums that make damage to written files detectable (bit rot, partial writes on
network filesystems, a full disk, a file deleted by hand).

    write_manifest(step_dir)            # size and sha256 of every file -> step_dir/integrity.json
    problem = verify_manifest(step_dir)   # None if every file is as written, else what is wrong
    digest = file_sha256(path)          # also used for exported models (export.py)

What is checksummed is the bytes of the files as written, not the array values: damage
happens to files, and every file of a checkpoint (array chunks, the OCDBT and sharding
indices, the JSON metadata) is needed to read it back, so a bad byte anywhere is caught
before anything is parsed. The values would need a hash that does not depend on how the
arrays are sharded (a checkpoint restores onto other meshes) and would miss damage to the
index files, which make orbax fail with errors that name no file.

Files the manifest does not cover (orbax writes them in its commit, after the manifest):
the step's commit marker and its bookkeeping metadata (`_CHECKPOINT_METADATA`, which gets
the commit time). Restoring needs neither, and orbax tolerates losing them. Files found on
disk but not in the manifest are ignored: they cannot change what is read back.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MANIFEST = "integrity.json"
FORMAT = 1
# Top-level files of a step directory outside the manifest (see the module docstring).
NOT_COVERED = frozenset({MANIFEST, "_CHECKPOINT_METADATA", "commit_success.txt"})
# hashlib releases the GIL on large buffers: files are hashed in parallel.
_WORKERS = min(8, os.cpu_count() or 1)


def file_sha256(path: str | Path) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def _covered_files(root: Path) -> list[str]:
  """Paths (relative, '/'-separated) of the regular files under `root` the manifest covers."""
  names = (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
  return sorted(n for n in names if n not in NOT_COVERED)


def _body_sha256(body: dict) -> str:
  return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_manifest(step_dir: str | Path) -> Path:
  """Records the size and sha256 of every file under `step_dir` in `step_dir/integrity.json`.

  Call it once the files are complete and before the directory becomes visible (the
  manifest is then part of the same atomic commit). The manifest carries its own checksum,
  so damage to it is told apart from damage to the files it lists.
  """
  step_dir = Path(step_dir)
  names = _covered_files(step_dir)
  with ThreadPoolExecutor(_WORKERS) as pool:
    digests = list(pool.map(lambda n: file_sha256(step_dir / n), names))
  files = {n: {"bytes": (step_dir / n).stat().st_size, "sha256": d}
           for n, d in zip(names, digests)}
  body = {"format": FORMAT, "algorithm": "sha256", "files": files}
  path = step_dir / MANIFEST
  with open(path, "w") as f:
    json.dump({**body, "manifest_sha256": _body_sha256(body)}, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  return path


def _read_manifest(step_dir: Path) -> tuple[dict | None, str | None]:
  """(the files the manifest lists, None) or (None, what is wrong with it)."""
  path = step_dir / MANIFEST
  try:
    text = path.read_bytes()
  except FileNotFoundError:
    return None, (f"{MANIFEST} is missing, so nothing can be verified (written before "
                  "checksums were recorded, or the file was lost)")
  except OSError as e:
    return None, f"cannot read {MANIFEST}: {e.strerror or e}"
  try:
    manifest = json.loads(text)
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    intact = manifest["manifest_sha256"] == _body_sha256(body)
    files = body["files"]
  except (ValueError, KeyError, TypeError, AttributeError):  # UnicodeDecodeError: ValueError
    intact = False
  if not intact:
    return None, f"{MANIFEST} is damaged (its own checksum does not match)"
  if body.get("format") != FORMAT or body.get("algorithm") != "sha256":
    return None, f"{MANIFEST} has an unknown format {body.get('format')!r}"
  return files, None


def _file_problem(step_dir: Path, name: str, want: dict) -> str | None:
  path = step_dir / name
  try:
    size = path.stat().st_size
    if size != want["bytes"]:
      how = "truncated" if size < want["bytes"] else "grown"
      return f"{name}: {how} ({size:,} bytes, {want['bytes']:,} written)"
    if file_sha256(path) != want["sha256"]:
      return f"{name}: contents differ from those written (sha256 mismatch)"
  except FileNotFoundError:
    return f"{name}: missing"
  except OSError as e:
    return f"{name}: cannot be read ({e.strerror or e})"
  return None


def verify_manifest(step_dir: str | Path, shown: int = 4) -> str | None:
  """None if every file `step_dir/integrity.json` lists has its recorded size and sha256;
  else what is wrong, naming the files (paths relative to `step_dir`)."""
  step_dir = Path(step_dir)
  files, problem = _read_manifest(step_dir)
  if problem:
    return problem
  with ThreadPoolExecutor(_WORKERS) as pool:
    found = list(pool.map(lambda n: _file_problem(step_dir, n, files[n]), sorted(files)))
  problems = [p for p in found if p]
  if not problems:
    return None
  more = f"; and {len(problems) - shown} more" if len(problems) > shown else ""
  return "; ".join(problems[:shown]) + more
