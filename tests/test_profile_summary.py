"""benchmarks.profile_summary: device-event selection, name grouping, shares and busy time on
hand-written traces, then a real CPU capture."""

import collections
import gzip
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import profile_summary as ps


def _meta(pid, pname, threads):
  out = [{"ph": "M", "pid": pid, "name": "process_name", "args": {"name": pname}}]
  out += [{"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": n}}
          for tid, n in threads.items()]
  return out


def _x(pid, tid, ts, dur, name, **args):
  return {"ph": "X", "pid": pid, "tid": tid, "ts": float(ts), "dur": float(dur), "name": name,
          "args": {k: str(v) for k, v in args.items()}}


def _write(path, events):
  with gzip.open(path, "wt") as fh:
    json.dump({"displayTimeUnit": "ns", "metadata": {}, "traceEvents": events}, fh)
  return str(path)


def _union(spans):
  total, end = 0.0, -np.inf
  for s, e in sorted(spans):
    total += max(0.0, e - max(s, end))
    end = max(end, e)
  return total


def test_normalise_and_category():
  assert ps.normalise("fusion.123") == "fusion"
  assert ps.normalise("loop_add_fusion_3") == "loop_add_fusion"
  assert ps.normalise("all-reduce-start.1.2") == "all-reduce-start"
  assert ps.normalise("ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)") \
      == "ncclDevKernel_AllReduce_Sum_f32_RING_LL"
  assert ps.normalise("void cutlass::Kernel2<x>(P)") == "cutlass::Kernel2<x>"
  assert ps.normalise("reduce_f32") == "reduce_f32"  # a dtype is not an instance number
  assert ps.category("nvjet_hsh_256x128", "custom-call.7") == "matmul"
  assert ps.category("ncclDevKernel_AllGather", "all-gather-start.2") == "collective"
  assert ps.category("loop_add_fusion_3", "loop_add_fusion.3") == "fusion"
  assert ps.category("while.5", "while.5") == "control-flow"
  assert ps.category("MemcpyD2D") == "memcpy"


def test_synthetic_gpu_trace(tmp_path, rng):
  """Device streams only (host events, even with hlo_op, and CUPTI overhead are ignored);
  kernel instances grouped by name without their numbers; shares sum to 1; rows sorted."""
  H, D = 7, 1  # host and device pids
  ev = _meta(H, "/host:CPU", {11: "python", 12: "Host Threads/12"})
  ev += _meta(D, "/device:GPU:0", {1: "Stream #7(Kernel)", 2: "Stream #13(Kernel,MemcpyD2D)",
                                   3: "CUPTI overhead"})
  kernels = {"loop_add_fusion_%d": "loop_add_fusion.%d", "input_reduce_fusion_%d":
             "input_reduce_fusion.%d", "nvjet_hsh_256x128_%d": "custom-call.%d"}
  want = {"loop_add_fusion": 0.0, "input_reduce_fusion": 0.0, "nvjet_hsh_256x128": 0.0,
          "ncclDevKernel_AllReduce_Sum_f32_RING_LL": 0.0, "MemcpyD2D": 0.0}
  counts = dict.fromkeys(want, 0)
  spans = []
  steps = 2
  t = 0.0
  for step in range(steps):
    ev.append(_x(H, 11, t, 5000.0, "train", step_num=step))  # StepTraceAnnotation
    ev.append(_x(H, 11, t, 4000.0, "PjitFunction(train_step)"))
    for i in range(int(rng.integers(5, 12))):
      fmt = list(kernels)[int(rng.integers(len(kernels)))]
      n = int(rng.integers(0, 40))
      dur = float(rng.uniform(1, 100))
      ev.append(_x(D, 1, t, dur, fmt % n, hlo_op=kernels[fmt] % n, hlo_module="jit_train_step"))
      ev.append(_x(H, 12, t - 5, 3.0, "cuLaunchKernel", hlo_op=kernels[fmt] % n))
      want[ps.normalise(fmt % n)] += dur
      counts[ps.normalise(fmt % n)] += 1
      spans.append((t, t + dur))
      if i == 2:  # a collective overlapping the compute stream, then a copy after it
        d2 = float(rng.uniform(50, 300))
        name = "ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)"
        ev.append(_x(D, 2, t + 1, d2, name, hlo_op=f"all-reduce-start.{step}"))
        ev.append(_x(D, 2, t + 1 + d2, 4.0, "MemcpyD2D", memcpy_details="size:64"))
        ev.append(_x(D, 3, t, 9999.0, "CUPTI overhead"))
        want[name.split("(")[0]] += d2
        want["MemcpyD2D"] += 4.0
        counts[name.split("(")[0]] += 1
        counts["MemcpyD2D"] += 1
        spans += [(t + 1, t + 1 + d2), (t + 1 + d2, t + 5 + d2)]
      t += dur + float(rng.uniform(0, 20))
    t += 500.0
  path = _write(tmp_path / "h.trace.json.gz", ev)

  rows = ps.summarise(path, top=None)
  assert {r["name"]: r["count"] for r in rows} == {k: v for k, v in counts.items() if v}
  for r in rows:
    np.testing.assert_allclose(r["total_ms"], want[r["name"]] / 1e3, rtol=1e-9)
  assert [r["total_ms"] for r in rows] == sorted((r["total_ms"] for r in rows), reverse=True)
  np.testing.assert_allclose(sum(r["share"] for r in rows), 1.0, rtol=1e-9)
  cats = {r["name"]: r["category"] for r in rows}
  assert cats.get("nvjet_hsh_256x128", "matmul") == "matmul"
  assert cats["ncclDevKernel_AllReduce_Sum_f32_RING_LL"] == "collective"
  assert len(ps.summarise(path, top=2)) == 2
  by_op = {r["name"] for r in ps.summarise(path, top=None, by="op")}
  assert "all-reduce-start" in by_op and not any(n[-1].isdigit() for n in by_op)

  tot = ps.totals(path)
  assert tot["steps"] == steps and tot["devices"] == 1
  np.testing.assert_allclose(tot["op_ms"], sum(want.values()) / 1e3, rtol=1e-9)
  np.testing.assert_allclose(tot["busy_ms"], _union(spans) / 1e3, rtol=1e-9)
  assert tot["busy_ms"] < tot["op_ms"]  # the collective overlapped compute
  # A thread regex overrides the rule: the host launch events alone.
  host = ps.summarise(path, top=None, threads=r"^/host:CPU/Host Threads")
  assert [r["name"] for r in host] == ["cuLaunchKernel"]


def test_group_by_source_name_stack(tmp_path, rng):
  """by="source": kernels grouped by the JAX name stack of their `tf_op` (the wrappers
  every op shares dropped; transforms and named scopes kept); kernels without one by name."""
  assert ps.source("jit(_generate)/while/body/closed_call/attention/dot_general") == \
      "attention/dot_general"
  assert ps.source("jit(f)/eval_jaxpr/attention/dot_general") == "attention/dot_general"
  assert ps.source("jit(step)/transpose(jvp(experts))/remat/dot_general") == \
      "transpose(jvp(experts))/dot_general"
  D = 1
  ev = _meta(D, "/device:GPU:0", {1: "Stream #7(Kernel)"})
  want = {"attention/dot_general": 0.0, "experts/dot_general": 0.0, "? MemcpyD2D": 0.0}
  t = 0.0
  for i in range(int(rng.integers(6, 20))):
    key = list(want)[i % 3]
    dur = float(rng.uniform(1, 50))
    tf = {} if key.startswith("?") else {"tf_op": f"jit(f)/while/body/{key}"}
    ev.append(_x(D, 1, t, dur, f"gemm_fusion_dot_general_{i}" if tf else "MemcpyD2D",
                 hlo_op=f"fusion.{i}", **tf))
    want[key] += dur
    t += dur + 1
  rows = ps.summarise(_write(tmp_path / "s.trace.json.gz", ev), top=None, by="source")
  assert {r["name"]: r["total_ms"] for r in rows} == pytest.approx(
      {k: v / 1e3 for k, v in want.items()})


def test_group_by_kernel_sums_a_fusion_over_the_layers(tmp_path, rng):
  """by="kernel": instructions that XLA deduplicated to one fused computation (its
  `deduplicated_name` metadata: one routing fusion of every layer) are one row, labelled
  with their name stack; others are rows of their own instruction."""
  hlo = "\n".join([
      "HloModule jit_decode, entry_computation_layout={()->()}",
      *[f'  %input_reduce_fusion.{i} = s32[256,64]{{1,0}} fusion(%p), kind=kInput, '
        f'metadata={{op_name="jit(decode)/while/body/router/reduce_sum" '
        f'deduplicated_name="input_reduce_fusion.15" scheduling_name="x"}}' for i in (28, 29)],
      '  %fusion.3 = bf16[8]{0} fusion(%q), kind=kLoop, '
      'metadata={op_name="jit(decode)/while/body/attention/convert_element_type"}',
  ])
  D = 1
  ev = _meta(D, "/device:GPU:0", {1: "Stream #7(Kernel)"})
  want = collections.Counter()
  t = 0.0
  for i in range(int(rng.integers(6, 20))):
    op = ("input_reduce_fusion.28", "input_reduce_fusion.29", "fusion.3")[i % 3]
    dur = float(rng.uniform(1, 50))
    ev.append(_x(D, 1, t, dur, op.replace(".", "_"), hlo_op=op, hlo_module="jit_decode",
                 tf_op="XlaModule:"))
    want["fusion.3 attention/convert_element_type" if op == "fusion.3"
         else "input_reduce_fusion.15 router/reduce_sum"] += dur
    t += dur + 1
  for name in ("body_mosaic_gpu_kernel", "kernel_mosaic_gpu_kernel", "body_mosaic_gpu_kernel"):
    # launched from a command buffer: its hlo_op is the buffer's, so the kernel's name counts
    dur = float(rng.uniform(1, 50))
    ev.append(_x(D, 1, t, dur, name, hlo_op="command_buffer_38", hlo_module="jit_decode",
                 tf_op="XlaModule:"))
    want[f"{name} [command_buffer]"] += dur
    t += dur + 1
  path = _write(tmp_path / "k.trace.json.gz", ev)
  rows = ps.summarise(path, top=None, by="kernel", hlo=hlo)
  assert {r["name"]: r["total_ms"] for r in rows} == pytest.approx(
      {k: v / 1e3 for k, v in want.items()})
  assert ps.summarise(path, top=None, by="kernel", hlo=ps.hlo_op_names(hlo),
                      dedup=ps.hlo_dedup_names(hlo)) == rows
  # without the HLO: one row per instruction
  assert {r["name"] for r in ps.summarise(path, top=None, by="kernel")} == {
      "input_reduce_fusion.28", "input_reduce_fusion.29", "fusion.3",
      "body_mosaic_gpu_kernel [command_buffer]", "kernel_mosaic_gpu_kernel [command_buffer]"}


def test_synthetic_cpu_trace_self_time(tmp_path, rng):
  """No device process: ops are the host events carrying hlo_op; a while loop's body ops on
  its thread are subtracted from its time, and "end:" markers are dropped."""
  H = 3
  ev = _meta(H, "/host:CPU", {1: "python", 2: "tf_XLAEigen/1", 3: "tf_XLAPjRtCpuClient/2"})
  body = rng.uniform(10, 50, size=3)
  w0, gap = 100.0, 2.0
  loop = float(body.sum() + gap * 4)
  ev.append(_x(H, 1, 0, 1000, "$train.py:10 step"))
  ev.append(_x(H, 3, w0, loop, "while.5", hlo_op="while.5", hlo_module="jit_f", device_ordinal=0))
  t = w0 + gap
  for i, d in enumerate(body):
    ev.append(_x(H, 3, t, d, f"ynn_fusion.{i}", hlo_op=f"ynn_fusion.{i}", device_ordinal=0))
    ev.append(_x(H, 3, t + d, 0.3, f"end: ynn_fusion.{i}"))
    t += d + gap
  ev.append(_x(H, 2, w0 + loop + 1, 7.0, "copy.6", hlo_op="copy.6", device_ordinal=0))
  ev.append(_x(H, 3, w0 - 50, 500, "ThunkExecutor::Execute (wait for completion)",
               device_ordinal=0))
  path = _write(tmp_path / "c.trace.json.gz", ev)
  rows = {r["name"]: r for r in ps.summarise(path, top=None)}
  assert set(rows) == {"ynn_fusion", "while", "copy"}
  np.testing.assert_allclose(rows["ynn_fusion"]["total_ms"] * 1e3, body.sum(), rtol=1e-9)
  np.testing.assert_allclose(rows["while"]["total_ms"] * 1e3, gap * 4, rtol=1e-6)
  assert rows["ynn_fusion"]["count"] == 3 and rows["while"]["category"] == "control-flow"
  tot = ps.totals(path, steps=1)
  np.testing.assert_allclose(tot["busy_ms"] * 1e3, loop + 7.0, rtol=1e-9)


def test_real_cpu_capture(tmp_path, rng):
  """jax.profiler on CPU writes a perfetto trace whose XLA op events summarise to fusions."""
  @jax.jit
  def f(x, w):
    return jax.nn.softmax(x @ w, axis=-1).sum()

  step = jax.jit(lambda s, x: (s + x @ s, (x @ s).sum()), donate_argnums=0)
  x = jnp.asarray(rng.normal(size=(64, 64)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(64, 64)), jnp.float32)

  path = ps.capture(f, x, w, logdir=str(tmp_path / "a"), warmup=1, steps=2)
  assert path.endswith("perfetto_trace.json.gz")
  rows = ps.summarise(path, top=None)
  assert rows, "no device events"
  names = [r["name"] for r in rows]
  assert any("fusion" in n or "dot" in n for n in names[:3]), names
  assert not any(n.startswith(("$", "PjitFunction", "end: ", "ThunkExecutor")) for n in names)
  np.testing.assert_allclose(sum(r["share"] for r in rows), 1.0, rtol=1e-9)
  tot = ps.totals(path)
  assert tot["steps"] == 2 and 0 < tot["busy_ms"] and tot["op_ms"] > 0
  assert "ms/step" in ps.format_table(rows, tot)

  # A donated train-step-like function runs only with carry=True (state fed back).
  s = jnp.asarray(rng.normal(size=(64, 64)) / 64, jnp.float32)
  path = ps.capture(step, s, x, logdir=str(tmp_path / "b"), steps=2, carry=True)
  assert ps.summarise(path) and ps.totals(path)["steps"] == 2


def test_source_from_compiled_hlo_when_events_lack_the_name_stack(tmp_path, rng, monkeypatch,
                                                                   capsys):
  """Events that lack the op's name stack (the CPU's carry no `tf_op`; the GPU's `tf_op` is
  the module's annotation, "XlaModule:") get it from the compiled HLO's op_name metadata,
  looked up by `hlo_op` or by kernel name (fusion.3 -> fusion_3)."""
  def f(x, w):
    with jax.named_scope("attention"):
      a = jax.nn.softmax(x @ w, axis=-1)
    with jax.named_scope("experts"):
      b = jnp.sort(a @ w.T, axis=-1) * 2.0
    return (a + b).sum()

  x = jnp.asarray(rng.normal(size=(96, 64)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(64, 64)), jnp.float32)
  compiled = jax.jit(f).lower(x, w).compile()
  hlo = ps.hlo_op_names(compiled.as_text())
  (module,) = hlo  # one program
  trace = ps.load_trace(ps.capture(compiled, x, w, logdir=str(tmp_path / "c"), steps=2))
  events = ps.device_events(trace)
  for e in events:  # as on the GPU
    e["args"]["tf_op"] = "XlaModule:"
  bare = ps.summarise(trace, top=None, by="source")
  assert all(r["name"].startswith("? ") for r in bare), bare
  rows = ps.summarise(trace, top=None, by="source", hlo=hlo)
  names = {r["name"] for r in rows}
  assert any(n.startswith("attention/") for n in names), names
  assert "experts/sort" in names, names  # jit(sort) is a wrapper source() drops
  assert sum(r["total_ms"] for r in rows) == pytest.approx(sum(r["total_ms"] for r in bare))
  # Each event's key is the op_name of its own instruction.
  for e in events:
    assert ps._group_key(e, "source", False, hlo) == ps.source(hlo[module][e["args"]["hlo_op"]])
  # The command line reads the HLO from files (an XLA dump's, here the compiled text).
  (tmp_path / "m.after_optimizations.txt").write_text(compiled.as_text())
  trace_file = _write(tmp_path / "bare.trace.json.gz", trace["traceEvents"])
  monkeypatch.setattr(sys, "argv", ["profile_summary", trace_file, "--by", "source", "--top",
                                    "50", "--hlo", str(tmp_path / "*.after_optimizations.txt")])
  ps.main()
  printed = capsys.readouterr().out
  assert "experts/sort" in printed and "? " not in printed, printed
  monkeypatch.setattr(sys, "argv", ["profile_summary", trace_file, "--by", "source",
                                    "--hlo", str(tmp_path / "none*.txt")])
  with pytest.raises(SystemExit):
    ps.main()
  assert "matches no file" in capsys.readouterr().err
  # The text itself works too; a kernel named like its instruction is found without hlo_op.
  assert ps.summarise(trace, top=None, by="source", hlo=compiled.as_text()) == rows
  instr = next(k for k, v in hlo[module].items() if "." in k and v.startswith("jit(f)/"))
  ev = _meta(0, "/device:GPU:0", {1: "Stream #7(Kernel)"}) + [
      _x(0, 1, 0.0, 5.0, instr.replace(".", "_"), tf_op="XlaModule:", hlo_module="other")]
  rows = ps.summarise(_write(tmp_path / "k.trace.json.gz", ev), top=None, by="source", hlo=hlo)
  assert [r["name"] for r in rows] == [ps.source(hlo[module][instr])]
  # An event the HLO does not place keeps its kernel name and shows its hlo_op.
  ev = _meta(0, "/device:GPU:0", {1: "Stream #7(Kernel)"}) + [
      _x(0, 1, 0.0, 5.0, "nvjet_sm90_tst_128x48", tf_op="XlaModule:", hlo_op="cublas-gemm.7")]
  rows = ps.summarise(_write(tmp_path / "u.trace.json.gz", ev), top=None, by="source", hlo=hlo)
  assert [r["name"] for r in rows] == ["? nvjet_sm90_tst_128x48 [cublas-gemm]"]


def test_timeline_and_window_of_a_synthetic_gpu_trace(tmp_path, rng):
  """timeline: the device's span, idle time in gaps and time by how many kernels run at
  once, per step, against a hand count of random kernels on two streams; window: one
  "layer" (from a marker kernel to the next) in start order with the gaps before each."""
  D = 1
  ev = _meta(D, "/device:GPU:0", {1: "Stream #7(Kernel)", 2: "Stream #9(Kernel)"})
  t, spans, rows, steps = 0.0, [], [], 2
  for step in range(steps):
    for layer in range(3):
      for k in range(4):   # marker, then three kernels; the second overlaps a side kernel
        gap = float(rng.uniform(0.5, 5.0))
        dur = float(rng.uniform(2.0, 50.0))
        t += gap
        name = "attention_kernel" if k == 0 else f"fusion_{layer}_{k}"
        ev.append(_x(D, 1, t, dur, name, hlo_op=f"{name}.1"))
        spans.append((t, t + dur))
        if (step, layer) == (1, 1):
          rows.append((name, gap, dur))
        if k == 2:   # beside it on the other stream, ending within it
          ev.append(_x(D, 2, t + 0.5, dur / 2, "side_fusion", hlo_op="side.1"))
          spans.append((t + 0.5, t + 0.5 + dur / 2))
          if (step, layer) == (1, 1):
            rows.append(("side_fusion", 0.0, dur / 2))
        t += dur
  path = _write(tmp_path / "h.trace.json.gz", ev)
  tl = ps.timeline(path, steps)
  span = max(e for _, e in spans) - min(s for s, _ in spans)
  busy = _union(spans)
  np.testing.assert_allclose(tl["span_ms"], span / steps / 1e3, rtol=1e-9)
  np.testing.assert_allclose(tl["idle_ms"], (span - busy) / steps / 1e3, rtol=1e-9)
  assert tl["gaps"] == (steps * 3 * 4 - 1) / steps   # every kernel on stream 1 but the first
  side = [(e["ts"], e["ts"] + e["dur"]) for e in ev if e.get("name") == "side_fusion"]
  np.testing.assert_allclose(tl["running_ms"][2], sum(b - a for a, b in side) / steps / 1e3,
                             rtol=1e-9)
  np.testing.assert_allclose(sum(tl["running_ms"].values()), tl["span_ms"], rtol=1e-9)
  win = ps.window(path, "attention_kernel", index=4)   # step 1, layer 1
  assert [r["name"] for r in win] == [n for n, _, _ in rows]
  np.testing.assert_allclose([r["dur_us"] for r in win], [d for _, _, d in rows])
  # the marker's own gap is not counted (the window starts there); the side kernel starts
  # while the one before it runs
  want_gaps = [0.0] + [0.0 if n == "side_fusion" else g for n, g, _ in rows[1:]]
  np.testing.assert_allclose([r["gap_us"] for r in win], want_gaps, rtol=1e-9, atol=1e-9)
  with pytest.raises(ValueError, match="0 events match 'nothing'"):
    ps.window(path, "nothing")
