"""Benchmark PythonSandbox against a fresh `python -c` subprocess per call (the naive baseline).

    python experiments/bench_sandbox.py            # a table
    python experiments/bench_sandbox.py --json     # one JSON object

Both are measured side by side in the same run, on the same machine, with the same interpreter
(the baseline gets the same thread-limiting environment). Latencies are end-to-end as the caller
sees them: request, execution, output back. Latency calls are paced (`--pace-ms`, 10 ms apart by
default), the way a rollout calls its tool between generation steps; the sandbox uses those pauses
to fork and warm the next call's process. Back-to-back calls, which leave it no pause, are
reported too; saturation is what the throughput figure (many concurrent sessions) measures.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import tyro

from envs.sandbox import PythonSandbox

TRIVIAL = "print(1+1)"
SYMPY = "import sympy as sp\nx = sp.Symbol('x')\nprint(sp.factor(x**4 - 1), sp.isprime(2**61 - 1))"


@dataclass(frozen=True)
class Args:
    """Sandbox benchmark settings."""

    calls: int = 300
    """Sandbox calls per latency measurement."""
    baseline_calls: int = 20
    """Subprocess calls per baseline measurement (each costs 50-700 ms)."""
    sessions: int = 16
    """Concurrent sessions in the throughput measurement."""
    calls_per_session: int = 40
    """Calls each concurrent session makes."""
    throughput_runs: int = 3
    """Throughput measurements; the figure is their median."""
    pace_ms: float = 10.0
    """Pause after each latency call (both sides), as generation leaves between tool calls."""
    json: bool = False
    """Print one JSON object instead of a table."""


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return statistics.median(ordered) * 1e3, p99 * 1e3


def time_calls(fn, n: int, pace_s: float = 0.0) -> list[float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
        if pace_s:
            time.sleep(pace_s)
    return samples


def subprocess_call(code: str) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OPENBLAS_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr


def checked(sandbox_call):
    def call():
        result = sandbox_call()
        assert result.status == "ok", result
    return call


def concurrent_throughput(sandbox: PythonSandbox, sessions: int, calls: int) -> float:
    errors: list[BaseException] = []
    start = threading.Barrier(sessions + 1)

    def worker():
        try:
            with sandbox.session() as s:
                start.wait()
                for i in range(calls):
                    r = s.run(f"acc = {i} * 2\nprint(acc)")
                    assert r.status == "ok", r
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            start.abort()

    threads = [threading.Thread(target=worker) for _ in range(sessions)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return sessions * calls / elapsed


def main(args: Args) -> dict:
    with PythonSandbox(pool_size=4) as sandbox:
        protections = sandbox.protections
        for _ in range(20):  # warm-up: page-in, pool full
            sandbox.run(TRIVIAL)
        pace = args.pace_ms / 1e3
        trivial = time_calls(checked(lambda: sandbox.run(TRIVIAL)), args.calls, pace)
        trivial_b2b = time_calls(checked(lambda: sandbox.run(TRIVIAL)), args.calls)
        sympy_ = time_calls(checked(lambda: sandbox.run(SYMPY)), args.calls // 2, pace)
        with sandbox.session() as s:
            s.run("import sympy as sp")
            session = time_calls(checked(lambda: s.run(TRIVIAL)), args.calls, pace)
            session_b2b = time_calls(checked(lambda: s.run(TRIVIAL)), args.calls)
        throughput_runs = [concurrent_throughput(sandbox, args.sessions, args.calls_per_session)
                           for _ in range(args.throughput_runs)]
    throughput = statistics.median(throughput_runs)
    base_trivial = time_calls(lambda: subprocess_call(TRIVIAL), args.baseline_calls, pace)
    base_sympy = time_calls(lambda: subprocess_call(SYMPY), args.baseline_calls, pace)

    (t50, t99), (s50, s99), (c50, c99) = map(percentiles, (trivial, sympy_, session))
    (tb50, tb99), (cb50, cb99) = map(percentiles, (trivial_b2b, session_b2b))
    (b50, b99), (bs50, bs99) = map(percentiles, (base_trivial, base_sympy))
    report = {
        "trivial_p50_ms": t50, "trivial_p99_ms": t99,
        "sympy_p50_ms": s50, "sympy_p99_ms": s99,
        "session_cell_p50_ms": c50, "session_cell_p99_ms": c99,
        "trivial_back_to_back_p50_ms": tb50, "trivial_back_to_back_p99_ms": tb99,
        "session_cell_back_to_back_p50_ms": cb50, "session_cell_back_to_back_p99_ms": cb99,
        "pace_ms": args.pace_ms,
        "subprocess_trivial_p50_ms": b50, "subprocess_trivial_p99_ms": b99,
        "subprocess_sympy_p50_ms": bs50, "subprocess_sympy_p99_ms": bs99,
        "trivial_speedup_vs_subprocess": b50 / t50,
        "sympy_speedup_vs_subprocess": bs50 / s50,
        "executions_per_s": throughput,
        "executions_per_s_runs": throughput_runs,
        "concurrent_sessions": args.sessions,
        "cpu_count": os.cpu_count(),
        "all_protections_on": all(protections.values()),
        "protections": protections,
    }
    if args.json:
        print(json.dumps(report))
    else:
        rows = [("print(1+1), fresh session", t50, t99, b50, b99),
                ("sympy snippet, fresh session", s50, s99, bs50, bs99),
                ("print(1+1), cell in a session", c50, c99, b50, b99),
                ("print(1+1), fresh, back-to-back", tb50, tb99, b50, b99),
                ("print(1+1), cell, back-to-back", cb50, cb99, b50, b99)]
        print(f"{'workload':32} {'sandbox p50':>12} {'p99':>8} {'subprocess p50':>15} {'p99':>8} "
              f"{'speed-up':>9}")
        for name, a, a99, b, b99_ in rows:
            print(f"{name:32} {a:10.2f}ms {a99:6.1f}ms {b:13.1f}ms {b99_:6.1f}ms {b / a:8.1f}x")
        print(f"latency calls {args.pace_ms:g} ms apart unless back-to-back")
        print(f"throughput: {throughput:.0f} executions/s with {args.sessions} concurrent sessions "
              f"on {os.cpu_count()} cores (median of "
              f"{', '.join(f'{t:.0f}' for t in throughput_runs)})")
        off = [k for k, v in protections.items() if not v]
        print("protections: " + ("all on" if not off else "off: " + ", ".join(off)))
    return report


if __name__ == "__main__":
    main(tyro.cli(Args))
