"""What a person sees: `WORKDIR/metrics.jsonl` (one object per logged step), TensorBoard
event files under `WORKDIR/tb`, and a progress line or bar."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np


def plain(value: Any) -> Any:
  value = np.asarray(value)
  if value.ndim == 0:
    v = value.item()
    return v if not isinstance(v, float) or math.isfinite(v) else str(v)
  return value.tolist()


class MetricsLog:
  """Appends metrics; on resume, drops entries after the resumed step (they will be redone)."""

  def __init__(self, workdir: Path, resume_step: int):
    self.path = Path(workdir) / "metrics.jsonl"
    if self.path.exists():
      kept = [line for line in self.path.read_text().splitlines()
              if line.strip() and json.loads(line).get("step", 0) <= resume_step]
      tmp = self.path.with_suffix(".jsonl.tmp")
      tmp.write_text("".join(line + "\n" for line in kept))
      tmp.replace(self.path)
    self._file = self.path.open("a")
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(str(Path(workdir) / "tb"), purge_step=resume_step + 1)
    except ImportError:  # TensorBoard files are optional; the JSONL file is the record
      self._tb = None

  def write(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    row = {"step": step, **{k: plain(v) for k, v in metrics.items()}}
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in row.items():
        if k == "step":
          continue
        if isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, step)
        elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
          for i, x in enumerate(v):
            self._tb.add_scalar(f"{k}/{i}", x, step)
    return row

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()


class Progress:
  """A tqdm bar on a terminal; one plain line per logged step otherwise (logs, CI)."""

  def __init__(self, total: int, initial: int):
    self.interactive = sys.stderr.isatty()
    self.total = total
    self._bar = None
    if self.interactive:
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

  def advance(self, n: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(n)

  def show(self, step: int, row: dict[str, Any], eta_s: float | None) -> None:
    short = {"loss": f"{row['loss']:.4f}", "tok/s": f"{row['tokens_per_s']:,.0f}"}
    if "val_loss" in row:
      short["val"] = f"{row['val_loss']:.4f}"
    if self._bar is not None:
      self._bar.set_postfix(short, refresh=True)
    else:
      eta = f" eta {_hms(eta_s)}" if eta_s is not None else ""
      print(f"step {step}/{self.total} " + " ".join(f"{k} {v}" for k, v in short.items())
            + f" lr {row['lr']:.2e}{eta}", flush=True)

  def note(self, text: str) -> None:
    if self._bar is not None:
      self._bar.write(text)
    else:
      print(text, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def _hms(seconds: float) -> str:
  s = int(seconds)
  return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
