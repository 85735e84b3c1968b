"""Top device operations by time from a `jax.profiler` trace, without TensorBoard.

    python -m benchmarks.profile_summary TRACE_OR_LOGDIR [--top 25]
        [--by name|op|source|kernel|category|module]
        [--raw] [--steps N] [--threads REGEX] [--hlo FILES] [--json OUT]
        [--timeline] [--window MARKER[:INDEX]]
    python -m benchmarks.profile_summary --demo [--logdir DIR]   # profile a toy program here

`capture` profiles a function and returns the trace file that jax writes; `summarise` groups
that trace's device-side complete events ("ph": "X") by op and ranks them by time.

What jax 0.11.2 writes: `stop_trace` exports `LOGDIR/plugins/profile/<date>/<host>.xplane.pb`
(for TensorBoard) and `<host>.trace.json.gz` (Chrome trace: {"traceEvents": [...]}, `ts`/`dur`
in microseconds); `create_perfetto_trace=True` adds `perfetto_trace.json.gz`, the same events
without the "metadata" key. The JSON holds the host plane (process "/host:CPU") and, on GPU or
TPU, one process per device plane ("/device:GPU:0", ...). It is capped at 5,000,000 events.

Device-event rule (`device_events`, overridable with a process/thread-name regex):
  * GPU/TPU: processes named "/device:*". Within each, the "XLA Ops" thread if there is one
    (TPU; op level), else the "Stream #*" threads (CUPTI kernels, memcpys, memsets; one per
    CUDA stream). Events there carry args hlo_op, hlo_module, tf_op, kernel_details.
    "CUPTI overhead", counter and derived lines ("XLA Modules", "Steps") are left out because
    they repeat the same time.
  * CPU (no "/device:" process): XLA runs ops on host threads (tf_XLAEigen/...,
    tf_XLAPjRtCpuClient/...), so the rule is "events whose args carry `hlo_op`": those are
    the thunk executions, with args hlo_op, hlo_module, device_ordinal, run_id. Python
    frames ("$file.py:12 f"), PjRt bookkeeping, "ThunkExecutor::Execute (wait ...)" and
    the "end: <op>" markers carry no hlo_op and are dropped.
Times are self (exclusive) times: a control-flow thunk (CPU `while.5`) encloses its body's
ops on the same thread, so children are subtracted to avoid counting them twice.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
from typing import Any, Callable

_SUFFIX = re.compile(r"(?:[._]\d+)+$")
# First match wins; tested against "<hlo_op> <event name>" in lower case.
_CATEGORIES = (
  ("collective", r"nccl|all-reduce|all-gather|reduce-scatter|all-to-all|collective"
                 r"|\bsend\b|\brecv\b|allreduce|allgather|reducescatter"),
  ("matmul", r"gemm|\bdot|_dot|matmul|cublas|xmma|cutlass|nvjet|convolution|cudnn"),
  ("memcpy", r"memcpy|memset|copy-start|copy-done"),
  ("copy/transpose", r"^(copy|transpose)\b"),
  ("control-flow", r"^(while|conditional|call)\b"),
  ("custom-call", r"custom-call|custom_call|triton|pallas|mosaic"),
  ("fusion", r"fusion|^wrapped_"),
)


def normalise(name: str) -> str:
  """Op name without its instance number: `fusion.123` -> `fusion`, `loop_add_fusion_3` ->
  `loop_add_fusion`, `ncclDevKernel_X(args)` -> `ncclDevKernel_X`; the op kind stays."""
  name = name.strip()
  if name.startswith("void "):
    name = name[5:]
  if "(" in name[1:]:
    name = name[:name.index("(", 1)]
  return _SUFFIX.sub("", name) or name


def category(name: str, hlo_op: str = "") -> str:
  """Coarse class of an op (matmul, collective, fusion, ...) from its HLO op and event name."""
  text = f"{hlo_op} {name}".strip().lower()
  for cat, pattern in _CATEGORIES:
    if re.search(pattern, text):
      return cat
  return "other"


def find_trace(path: str) -> str:
  """The trace file itself, or the newest `*.trace.json.gz`/`perfetto_trace.json.gz` under a
  log directory (jax writes one `plugins/profile/<date>/` folder per trace)."""
  if os.path.isfile(path):
    return path
  found = [p for pat in ("**/perfetto_trace.json.gz", "**/*.trace.json.gz", "**/*.trace.json")
           for p in glob.glob(os.path.join(path, pat), recursive=True)]
  if not found:
    pb = glob.glob(os.path.join(path, "**/*.xplane.pb"), recursive=True)
    raise FileNotFoundError(f"no trace JSON under {path}"
                            + (f" (only {pb[0]}: open it with xprof)" if pb else ""))
  return max(found, key=lambda p: (os.path.getmtime(os.path.dirname(p)), "perfetto" in p))


def load_trace(path: str) -> dict:
  """The parsed trace ({"traceEvents": [...]}) of a file or log directory (see find_trace)."""
  path = find_trace(path)
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as fh:
    trace = json.load(fh)
  return {"traceEvents": trace} if isinstance(trace, list) else trace


def _as_trace(trace: str | dict) -> dict:
  return load_trace(trace) if isinstance(trace, (str, os.PathLike)) else trace


def _names(events: list[dict]) -> tuple[dict, dict]:
  procs, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      procs[e["pid"]] = e.get("args", {}).get("name", "")
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e.get("tid"))] = e.get("args", {}).get("name", "")
  return procs, threads


def device_events(trace: str | dict, threads: str | None = None) -> list[dict]:
  """Complete events that ran on a device, by the module docstring's rule; or, with
  `threads`, those whose "<process name>/<thread name>" matches that regex."""
  events = _as_trace(trace)["traceEvents"]
  procs, names = _names(events)
  xs = [e for e in events if e.get("ph") == "X" and "dur" in e]
  if threads is not None:
    rx = re.compile(threads)
    return [e for e in xs
            if rx.search(f"{procs.get(e['pid'], '')}/{names.get((e['pid'], e.get('tid')), '')}")]
  devices = {pid for pid, n in procs.items() if n.startswith("/device:")}
  if not devices:
    return [e for e in xs if "hlo_op" in e.get("args", {})]
  keep = set()
  for pid in devices:
    lines = {k: n for k, n in names.items() if k[0] == pid}
    ops = {k for k, n in lines.items() if n == "XLA Ops"}
    keep |= ops or {k for k, n in lines.items() if n.startswith("Stream")}
  return [e for e in xs if (e["pid"], e.get("tid")) in keep]


def self_times(events: list[dict]) -> list[float]:
  """Each event's duration (us) less that of the events nested directly in it on its thread."""
  out = [float(e["dur"]) for e in events]
  by_thread = collections.defaultdict(list)
  for i, e in enumerate(events):
    by_thread[(e["pid"], e.get("tid"))].append(i)
  eps = 1e-3
  for idx in by_thread.values():
    idx.sort(key=lambda i: (events[i]["ts"], -events[i]["dur"]))
    stack: list[tuple[float, int]] = []  # (end, index)
    for i in idx:
      start, end = events[i]["ts"], events[i]["ts"] + events[i]["dur"]
      while stack and (start >= stack[-1][0] - eps or end > stack[-1][0] + eps):
        stack.pop()
      if stack:
        out[stack[-1][1]] -= float(events[i]["dur"])
      stack.append((end, i))
  return [max(t, 0.0) for t in out]


def _device_key(e: dict) -> tuple:
  return (e["pid"], e.get("args", {}).get("device_ordinal"))


def _busy_us(events: list[dict]) -> float:
  """Union of the events' intervals, summed over devices: time a device was running something."""
  per_device = collections.defaultdict(list)
  for e in events:
    per_device[_device_key(e)].append((e["ts"], e["ts"] + e["dur"]))
  total = 0.0
  for spans in per_device.values():
    spans.sort()
    cur_s, cur_e = spans[0]
    for s, t in spans[1:]:
      if s > cur_e:
        total += cur_e - cur_s
        cur_s, cur_e = s, t
      else:
        cur_e = max(cur_e, t)
    total += cur_e - cur_s
  return total


_NOISE = re.compile(r"^(p?jit\(.*\)|while|body|cond|closed_call|checkpoint|remat\w*|scan|"
                    r"shard_map|core_call|eval_jaxpr|custom_jvp_call|custom_vjp_call\w*)$")


def source(tf_op: str) -> str:
  """The JAX name stack of an op (its `tf_op` arg: the HLO op_name metadata, e.g.
  `jit(_generate)/while/body/attention/dot_general`) without the wrappers every op shares
  (jit(...), while/body, closed_call, remat, ...): `attention/dot_general`; transforms
  (`jvp(...)`, `transpose(...)`) and named scopes stay."""
  parts = [p for p in tf_op.split("/") if p and not _NOISE.match(p)]
  return "/".join(parts) or tf_op


_HLO_MODULE = re.compile(r"^HloModule\s+([\w.\-]+)")
_HLO_OP_NAME = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?\bop_name="([^"]*)"')
_HLO_DEDUP = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?\bdeduplicated_name="([^"]*)"')


def _hlo_table(hlo: str | list[str], pattern: re.Pattern) -> dict[str, dict[str, str]]:
  """{module: {instruction (and its kernel name): pattern's second group}} from HLO text."""
  out: dict[str, dict[str, str]] = {}
  for text in [hlo] if isinstance(hlo, str) else hlo:
    names: dict[str, str] = {}
    module = "?"
    for line in text.splitlines():
      m = _HLO_MODULE.match(line)
      if m:
        module = m.group(1)
        continue
      m = pattern.match(line)
      if m:
        names[m.group(1)] = m.group(2)
        names.setdefault(re.sub(r"[.\-]", "_", m.group(1)), m.group(2))  # kernel names
    out.setdefault(module, {}).update(names)
  return out


def hlo_dedup_names(hlo: str | list[str]) -> dict[str, dict[str, str]]:
  """{module name: {instruction: deduplicated_name metadata}} from optimised HLO text: XLA
  names instructions that run the same fused computation alike (one routing fusion of
  every layer of an unrolled model), so `by="kernel"` sums each distinct kernel over the
  layers."""
  return _hlo_table(hlo, _HLO_DEDUP)


def hlo_op_names(hlo: str | list[str]) -> dict[str, dict[str, str]]:
  """{module name: {instruction: op_name metadata}} from optimised HLO text
  (`jax.stages.Compiled.as_text()`, or XLA's `*after_optimizations.txt` dumps): where an op
  of the trace came from when its events do not say. On the GPU in jax 0.11.2 they do not:
  a kernel's `tf_op` is the module's annotation ("XlaModule:"), not the op's name stack, so
  `source` looks the event's `hlo_op` (or its kernel name, `fusion.3` -> `fusion_3`) up
  here."""
  return _hlo_table(hlo, _HLO_OP_NAME)


def _lookup(args: dict, name: str, table: dict[str, dict[str, str]] | None) -> str | None:
  """An event's entry in a {module: {instruction: value}} table, by module and `hlo_op`
  or kernel name."""
  if not table:
    return None
  module = re.sub(r"\(.*$", "", str(args.get("hlo_module", "")))
  for t in [table[module]] if module in table else list(table.values()):
    for key in (args.get("hlo_op"), name):
      if key and key in t:
        return t[key]
  return None


def _op_name(args: dict, name: str, hlo: dict[str, dict[str, str]] | None) -> str | None:
  """An event's op_name: its `tf_op` unless that is only the module's annotation, else its
  `op_name` arg (XLA's detailed annotations), else looked up in `hlo` by module and
  `hlo_op` or kernel name."""
  tf_op = args.get("tf_op", "")
  if tf_op and not tf_op.startswith("XlaModule"):
    return tf_op
  if args.get("op_name"):
    return args["op_name"]
  return _lookup(args, name, hlo)


def _group_key(e: dict, by: str, raw: bool,
               hlo: dict[str, dict[str, str]] | None = None,
               dedup: dict[str, dict[str, str]] | None = None) -> str:
  args = e.get("args", {})
  norm = (lambda s: s) if raw else normalise
  if by == "name":
    return norm(e["name"])
  if by == "kernel":  # one distinct kernel (its deduplicated name) and where it comes from
    op_name = _op_name(args, e["name"], hlo)
    kernel = _lookup(args, e["name"], dedup)
    if kernel is None:
      op = args.get("hlo_op", "")
      # a kernel launched from a command buffer carries the buffer's instruction as its
      # hlo_op (every kernel in it alike): then the kernel's own name
      kernel = (f"{norm(e['name'])} [{normalise(op)}]" if op.startswith("command_buffer")
                else op or norm(e["name"]))
    return f"{kernel} {source(op_name)}" if op_name else kernel
  if by == "source":  # where in the program: the JAX name stack of the op
    op_name = _op_name(args, e["name"], hlo)
    if op_name:
      return source(op_name)
    # Unplaced: by kernel name, with the event's hlo_op when it has one that `hlo` lacks
    # (what to look up next time).
    op = f" [{normalise(args['hlo_op'])}]" if hlo and args.get("hlo_op") else ""
    return f"? {norm(e['name'])}{op}"
  if by == "op":
    return norm(args.get("hlo_op") or e["name"])
  if by == "category":
    return category(e["name"], args.get("hlo_op", ""))
  if by == "module":
    return norm(args.get("hlo_module") or "?")
  raise ValueError(f"by must be name, op, source, kernel, category or module, not {by!r}")


def summarise(trace_path: str | dict, top: int | None = 25, by: str = "name",
              raw: bool = False, threads: str | None = None,
              hlo: str | list[str] | dict | None = None,
              dedup: str | list[str] | dict | None = None) -> list[dict]:
  """Device ops grouped by `by` (normalised event name, normalised `hlo_op` arg, `source`:
  the JAX name stack of the op, category or `hlo_module`; `raw` keeps instance numbers),
  ranked by self time. Rows: {name, category,
  total_ms (all steps, all devices), count, share (of all device op time; the shares of all
  rows sum to 1)}; the first `top` rows (all if None). `trace_path`: file, logdir or loaded.
  `hlo`: the profiled program's optimised HLO text(s) (`Compiled.as_text()`) or
  `hlo_op_names` of them, for `by="source"` where the events lack the name stack (GPU).
  `by="kernel"`: each distinct kernel, by its instruction's `deduplicated_name` (`dedup`:
  the HLO text or `hlo_dedup_names` of it; the text of `hlo` when not given), with its
  name stack: a routing fusion of every layer is one row."""
  if by == "kernel" and dedup is None and isinstance(hlo, (str, list)):
    dedup = hlo
  if isinstance(dedup, (str, list)):
    dedup = hlo_dedup_names(dedup)
  if isinstance(hlo, (str, list)):
    hlo = hlo_op_names(hlo)
  events = device_events(trace_path, threads)
  times = self_times(events)
  total: dict[str, float] = collections.defaultdict(float)
  count: dict[str, int] = collections.Counter()
  cats: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for e, t in zip(events, times):
    key = _group_key(e, by, raw, hlo, dedup)
    total[key] += t
    count[key] += 1
    cats[key][category(e["name"], e.get("args", {}).get("hlo_op", ""))] += t
  all_us = sum(total.values()) or 1.0
  rows = [{"name": k, "category": cats[k].most_common(1)[0][0], "total_ms": v / 1e3,
           "count": count[k], "share": v / all_us}
          for k, v in sorted(total.items(), key=lambda kv: -kv[1])]
  return rows if top is None else rows[:top]


def totals(trace_path: str | dict, steps: int | None = None, threads: str | None = None) -> dict:
  """Whole-trace numbers: devices, steps (given, else the distinct `step_num`s of
  StepTraceAnnotation events as `capture` writes, else 1), summed op self time and device
  busy time (union of op intervals), in ms, and both per step per device."""
  trace = _as_trace(trace_path)
  events = device_events(trace, threads)
  if steps is None:
    nums = {e["args"]["step_num"] for e in trace["traceEvents"]
            if e.get("ph") == "X" and "step_num" in e.get("args", {})}
    steps = len(nums) or 1
  devices = len({_device_key(e) for e in events}) or 1
  op_ms = sum(self_times(events)) / 1e3
  busy_ms = _busy_us(events) / 1e3 if events else 0.0
  return {"events": len(events), "devices": devices, "steps": steps, "op_ms": op_ms,
          "busy_ms": busy_ms, "op_ms_per_step": op_ms / steps / devices,
          "busy_ms_per_step": busy_ms / steps / devices}


def timeline(trace_path: str | dict, steps: int = 1, threads: str | None = None) -> dict:
  """Where a device's time goes between its first event's start and its last event's end
  (the first device's, where the trace holds several), per step, in ms: `span`; `idle`
  (no event running) in `gaps` gaps (a step) of median `median_gap_us`; and by how many
  events run at once, `running` {0, 1, 2, "3+"}. A latency-bound program shows as idle
  time (launch gaps) or as one event at a time on a chain of short ones."""
  events = device_events(trace_path, threads)
  if not events:
    raise ValueError("timeline: the trace has no device events")
  first = _device_key(min(events, key=lambda e: e["ts"]))
  spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if _device_key(e) == first)
  edges = sorted([(s, 1) for s, _ in spans] + [(t, -1) for _, t in spans])
  running = collections.Counter()
  level, last = 0, edges[0][0]
  for t, d in edges:
    running[min(level, 3)] += t - last
    level, last = level + d, t
  gaps, end = [], spans[0][0]
  for s, t in spans:
    if s > end:
      gaps.append(s - end)
    end = max(end, t)
  per = 1e3 * steps
  return {"span_ms": (edges[-1][0] - edges[0][0]) / per, "idle_ms": running[0] / per,
          "gaps": len(gaps) / steps,
          "median_gap_us": float(sorted(gaps)[len(gaps) // 2]) if gaps else 0.0,
          "running_ms": {("3+" if k == 3 else k): v / per for k, v in sorted(running.items())}}


def window(trace_path: str | dict, marker: str, index: int = 0,
           threads: str | None = None) -> list[dict]:
  """The device events from the `index`-th whose name or hlo_op contains `marker` (a
  kernel that runs once a layer, say) up to the next such one, in start order: [{start_us
  (from the first), gap_us (idle before it), dur_us, name, hlo_op}]: one layer's kernels
  and what the device waited between them."""
  events = sorted(device_events(trace_path, threads), key=lambda e: e["ts"])
  hits = [i for i, e in enumerate(events)
          if marker in e["name"] or marker in e.get("args", {}).get("hlo_op", "")]
  if len(hits) < index + 2:
    raise ValueError(f"window: {len(hits)} events match {marker!r}; index {index} needs "
                     f"{index + 2}")
  a, b = hits[index], hits[index + 1]
  base = end = events[a]["ts"]
  rows = []
  for e in events[a:b]:
    rows.append({"start_us": e["ts"] - base, "gap_us": max(0.0, e["ts"] - end),
                 "dur_us": float(e["dur"]), "name": e["name"],
                 "hlo_op": e.get("args", {}).get("hlo_op", "")})
    end = max(end, e["ts"] + e["dur"])
  return rows


def capture(fn: Callable, *args: Any, logdir: str, warmup: int = 1, steps: int = 3,
            carry: bool = False) -> str:
  """Profile `steps` calls of `fn(*args)` after `warmup` unprofiled ones (compilation), each
  blocked until ready and wrapped in a StepTraceAnnotation("profile_step", step_num=i);
  returns the trace file written under `logdir`. `carry=True` feeds `fn`'s first output
  back as its first argument (a train step `state, metrics = step(state, batch)` whose
  state is donated cannot be called twice on the same arrays)."""
  import jax

  def call(args: tuple) -> tuple:
    out = jax.block_until_ready(fn(*args))
    return (out[0], *args[1:]) if carry else args

  for _ in range(warmup):
    args = call(args)
  with jax.profiler.trace(logdir, create_perfetto_trace=True):
    for i in range(steps):
      with jax.profiler.StepTraceAnnotation("profile_step", step_num=i):
        args = call(args)
  return find_trace(logdir)


def format_table(rows: list[dict], tot: dict | None = None) -> str:
  """Fixed-width table of `summarise` rows, with per-step times when `totals` is given."""
  per = (tot["steps"] * tot["devices"]) if tot else 1
  lines = [f"{'#':>3} {'ms/step' if tot else 'total ms':>10} {'share':>7} {'count':>7}  "
           f"{'category':<15} name"]
  for i, r in enumerate(rows, 1):
    lines.append(f"{i:>3} {r['total_ms'] / per:>10.3f} {r['share']:>7.1%} {r['count']:>7}  "
                 f"{r['category']:<15} {r['name'][:90]}")
  if tot:
    lines.append(f"device busy {tot['busy_ms_per_step']:.3f} ms/step, op time "
                 f"{tot['op_ms_per_step']:.3f} ms/step (per device; {tot['steps']} steps, "
                 f"{tot['devices']} device(s), {tot['events']} events)")
  return "\n".join(lines)


def demo(logdir: str | None = None) -> str:
  """Profile a small jitted matmul + softmax + scan on the default backend; its trace path."""
  import jax
  import jax.numpy as jnp

  @jax.jit
  def f(x, w):
    y = jax.nn.softmax(x @ w, axis=-1)
    c, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), y, None, length=4)
    return c.sum()

  kx, kw = jax.random.split(jax.random.key(int.from_bytes(os.urandom(4), "little")))
  x, w = jax.random.normal(kx, (512, 512)), jax.random.normal(kw, (512, 512)) / 512**0.5
  return capture(f, x, w, logdir=logdir or tempfile.mkdtemp(prefix="profile_demo_"))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("trace", nargs="?", help="trace file (.json.gz) or jax.profiler log dir")
  ap.add_argument("--top", type=int, default=25)
  ap.add_argument("--by", default="name",
                  choices=("name", "op", "source", "kernel", "category", "module"))
  ap.add_argument("--raw", action="store_true", help="keep instance numbers (fusion.123)")
  ap.add_argument("--steps", type=int, default=None)
  ap.add_argument("--threads", default=None, help="regex on 'process/thread' names")
  ap.add_argument("--json", default=None, help="write {trace, totals, rows} here")
  ap.add_argument("--demo", action="store_true", help="profile a toy program first")
  ap.add_argument("--logdir", default=None, help="with --demo: where the trace goes")
  ap.add_argument("--timeline", action="store_true",
                  help="also the device's idle time, gaps and concurrency per step")
  ap.add_argument("--window", default=None, metavar="MARKER[:INDEX]",
                  help="also the events from the INDEX-th (default 0) whose name or hlo_op "
                       "contains MARKER to the next one, with the gaps between them")
  ap.add_argument("--hlo", default=None,
                  help="with --by source or kernel: the program's optimised HLO text, files "
                       "or globs, "
                       "comma-separated (XLA_FLAGS='--xla_dump_to=DIR --xla_dump_hlo_as_text' "
                       "writes DIR/*after_optimizations.txt): the name stacks the GPU's "
                       "events lack")
  args = ap.parse_args()
  if args.demo == bool(args.trace):
    ap.error("give a TRACE_OR_LOGDIR or --demo")
  path = demo(args.logdir) if args.demo else find_trace(args.trace)
  trace = load_trace(path)
  hlo = None
  if args.hlo:
    files = [f for g in args.hlo.split(",") for f in sorted(glob.glob(g))]
    if not files:
      ap.error(f"--hlo {args.hlo!r} matches no file")
    hlo = []
    for f in files:
      with open(f) as fh:
        hlo.append(fh.read())
  rows = summarise(trace, args.top, args.by, args.raw, args.threads, hlo)
  tot = totals(trace, args.steps, args.threads)
  print(path)
  print(format_table(rows, tot))
  if args.timeline:
    print("timeline (per step):", json.dumps(timeline(trace, tot["steps"], args.threads)))
  if args.window:
    marker, _, index = args.window.partition(":")
    for r in window(trace, marker, int(index or 0), args.threads):
      print(f"  +{r['start_us']:8.1f} gap {r['gap_us']:5.1f} dur {r['dur_us']:7.1f}  "
            f"{r['name'][:60]} {r['hlo_op'][:40]}")
  if args.json:
    with open(args.json, "w") as fh:
      json.dump({"trace": path, "by": args.by, "totals": tot, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
  main()
