"""benchmarks.multi_gpu's plan and the way its rows reach the measuring child process."""

import argparse
import json
import subprocess

from benchmarks import multi_gpu, train_step


def test_plans_have_naive_rows_for_both_exchanges_only_with_groups():
  mohge = [name for name, *_ in multi_gpu.plans("configs/mohge_3b.yaml", 2)]
  assert "EP2 all_gather naive" in mohge and "EP2 all_to_all naive" in mohge
  assert mohge[0] == "1 GPU" and mohge[-1].startswith("DP2")
  moe = [name for name, *_ in multi_gpu.plans("configs/moe_3b.yaml", 2)]  # one group
  assert not any("naive" in name for name in moe)


def test_child_is_profiled_only_when_the_row_asks(monkeypatch):
  """The profile goes to the row that asks for it (multi_gpu: the first EP row), not to
  every row of a run given --profile: tracing each row cost a call its last rows."""
  seen = []

  def run(cmd, **kw):
    seen.append(cmd)
    return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps({"step_ms": 1.0}) + "\n",
                                       stderr="")

  monkeypatch.setattr(subprocess, "run", run)
  args = argparse.Namespace(seq=128, reps=1, routing="uniform", profile="/tmp/p")
  assert train_step._in_subprocess("configs/tiny.yaml", 2, args, [], "/tmp/c") == {"step_ms": 1.0}
  train_step._in_subprocess("configs/tiny.yaml", 2, args, [], "/tmp/c", profile="/tmp/p/x")
  assert "--profile" not in seen[0]
  assert seen[1][seen[1].index("--profile") + 1] == "/tmp/p/x"
  assert seen[0][seen[0].index("--routing") + 1] == "uniform"
