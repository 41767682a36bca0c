"""Where the time goes: a `jax.profiler` trace of a few calls, reduced to the XLA
operations (thunks) that took the most time.

On CPU the trace records one event per executed XLA thunk (convolutions, fusions,
YNNPACK/oneDNN matmul fusions, copies); Python and PjRt framework events are left out.
"""

import collections
import glob
import gzip
import json
import os
import re
from typing import Any, Callable

import jax

# Events that are the runtime around the computation, not the computation.
_FRAMEWORK = re.compile(r'^(\$|end: |PjitFunction|CommonPjRt|PjRt|ThunkExecutor|Allocate|'
                        r'Handle |ParseArguments|PythonRefManager|TfrtCpu|Execute)')


def op_kind(name: str) -> str:
  """'convolution.123' -> 'convolution', 'fusion.7' -> 'fusion', 'ynn_fusion.1' -> 'ynn_fusion'."""
  return re.sub(r'(\.\d+)+$', '', name)


def top_ops(trace_events: list[dict[str, Any]], top: int = 15) -> dict[str, Any]:
  """Totals of complete ('X') events by op name and by op kind, in milliseconds.

  Returns {'total_ms', 'by_kind': [(kind, ms, share)], 'top_ops': [(name, ms, calls)]}.
  """
  by_name: collections.Counter = collections.Counter()
  calls: collections.Counter = collections.Counter()
  for event in trace_events:
    if event.get('ph') != 'X' or _FRAMEWORK.match(event.get('name', '')):
      continue
    by_name[event['name']] += event.get('dur', 0.0) / 1e3
    calls[event['name']] += 1
  total = sum(by_name.values())
  by_kind: collections.Counter = collections.Counter()
  for name, ms in by_name.items():
    by_kind[op_kind(name)] += ms
  return {
      'total_ms': total,
      'by_kind': [(k, ms, ms / total if total else 0.0) for k, ms in by_kind.most_common(top)],
      'top_ops': [(n, ms, calls[n]) for n, ms in by_name.most_common(top)],
  }


def profile_calls(fn: Callable[[], Any], log_dir: str, calls: int = 2,
                  top: int = 15) -> dict[str, Any]:
  """Runs `fn` (which must block until done) `calls` times under `jax.profiler.trace`
  into `log_dir` (viewable in TensorBoard's profile tab or Perfetto) and returns
  `top_ops` of the trace, plus 'calls' and 'trace' (the trace file)."""
  os.makedirs(log_dir, exist_ok=True)
  before = set(glob.glob(os.path.join(log_dir, '**', 'perfetto_trace.json.gz'),
                         recursive=True))
  with jax.profiler.trace(log_dir, create_perfetto_trace=True):
    for _ in range(calls):
      fn()
  new = sorted(set(glob.glob(os.path.join(log_dir, '**', 'perfetto_trace.json.gz'),
                             recursive=True)) - before)
  if not new:
    raise RuntimeError(f'jax.profiler wrote no perfetto trace under {log_dir}')
  with gzip.open(new[-1], 'rt') as f:
    data = json.load(f)
  events = data['traceEvents'] if isinstance(data, dict) else data
  return {**top_ops(events, top), 'calls': calls, 'trace': new[-1]}


def format_report(report: dict[str, Any]) -> str:
  """Human-readable top-ops table (per call)."""
  n = report['calls']
  lines = [f'profile: {report["total_ms"] / n:.0f} ms of XLA ops per call ({report["trace"]})',
           '  by kind:']
  lines += [f'    {k:<28s} {ms / n:9.1f} ms  {share:6.1%}' for k, ms, share in report['by_kind']]
  lines.append('  top ops:')
  lines += [f'    {name:<28s} {ms / n:9.1f} ms  x{c // n}' for name, ms, c in report['top_ops']]
  return '\n'.join(lines)
