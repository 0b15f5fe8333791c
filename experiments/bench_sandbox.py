"""Benchmark PythonSandbox against the floor (a bare fork of a warm interpreter, no isolation) and
against a fresh `python -c` subprocess per call (the naive baseline).

    python experiments/bench_sandbox.py            # a table
    python experiments/bench_sandbox.py --json     # one JSON object

All are measured side by side in the same run, on the same machine, with the same interpreter
(the baseline gets the same thread-limiting environment). The floor is what any fork-based
sandbox costs at least: a server interpreter with the sandbox's preloads imported forks a child
per call, which runs the code with its stdout on a pipe; the server sends the output back and
reaps the child. It has no namespace, no uid, no limit, no pre-forked process and no cleanup.
The floor and the sandbox alternate, round by round (`--rounds`), so that the host's load, which
moves here by up to a factor of two from minute to minute, weighs on both alike; each figure is
the median over the rounds of each round's median. Both ratios divide by the floor's
back-to-back calls (the floor's paced calls, also reported, are slower on this host).

Latencies are end-to-end as the caller sees them: request, execution, output back. Latency
calls are paced (`--pace-ms`, 10 ms apart by default), the way a rollout calls its tool between
generation steps; the sandbox uses those pauses to fork and warm the next call's process.
Back-to-back calls, which leave it no pause, are reported too; saturation is what the throughput
figure (many concurrent sessions) measures. The floor's throughput is measured the same way, with
as many floor servers as sessions, each run alternating with one of the sandbox's;
`throughput_vs_floor` is the median of those runs' ratios.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import tyro

from toolgrpo.envs.sandbox import DEFAULT_PRELOAD, FIXED_ENV, PythonSandbox

TRIVIAL = "print(1+1)"
SYMPY = "import sympy as sp\nx = sp.Symbol('x')\nprint(sp.factor(x**4 - 1), sp.isprime(2**61 - 1))"


@dataclass(frozen=True)
class Args:
    """Sandbox benchmark settings."""

    calls: int = 300
    """Sandbox calls per latency measurement (split over the rounds of the floor comparison)."""
    rounds: int = 3
    """Alternating rounds of floor and sandbox calls (back-to-back and paced)."""
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


FLOOR_SERVER = """
import os, struct, sys
for name in sys.argv[1].split(","):
    __import__(name)
frame = struct.Struct("!I")
inp, out = sys.stdin.buffer, sys.stdout.buffer
while header := inp.read(4):
    code = inp.read(frame.unpack(header)[0])
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.dup2(w, 1)
        sys.stdout = open(1, "w", closefd=False)
        exec(compile(code, "<cell>", "exec"), {"__name__": "__main__"})
        sys.stdout.flush()
        os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 1 << 16):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    result = b"".join(chunks)
    out.write(frame.pack(len(result)) + result)
    out.flush()
"""


class Floor:
    """The bare fork of a warm interpreter: a server with the sandbox's preloads imported that
    forks a child per call (FLOOR_SERVER)."""

    frame = struct.Struct("!I")

    def __init__(self):
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **FIXED_ENV}
        cmd = [sys.executable, "-c", FLOOR_SERVER, ",".join(DEFAULT_PRELOAD)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        assert self.proc.stdin is not None and self.proc.stdout is not None  # both are pipes
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout

    def run(self, code: str) -> bytes:
        data = code.encode()
        self.stdin.write(self.frame.pack(len(data)) + data)
        self.stdin.flush()
        n = self.frame.unpack(self.stdout.read(4))[0]
        return self.stdout.read(n)

    def close(self) -> None:
        self.stdin.close()
        self.proc.wait(timeout=10)


def subprocess_call(code: str) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OPENBLAS_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, env=env, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr


def checked(sandbox_call):
    def call():
        result = sandbox_call()
        assert result.status == "ok", result

    return call


def concurrent_throughput(sandbox: PythonSandbox, sessions: int, calls: int) -> float:
    """Calls per second from `sessions` threads, each with a session of its own."""

    def worker(start: threading.Barrier):
        with sandbox.session() as s:
            start.wait()
            for i in range(calls):
                r = s.run(f"acc = {i} * 2\nprint(acc)")
                assert r.status == "ok", r

    return _throughput([worker] * sessions, calls)


def floor_throughput(floors: list[Floor], calls: int) -> float:
    """The same load on the floor: one thread per floor server."""

    def worker(start: threading.Barrier, floor: Floor):
        start.wait()
        for i in range(calls):
            assert floor.run(f"acc = {i} * 2\nprint(acc)") == f"{i * 2}\n".encode()

    return _throughput([functools.partial(worker, floor=f) for f in floors], calls)


def _throughput(workers: list, calls: int) -> float:
    """Calls per second of `workers` (each makes `calls` calls once the barrier it is passed
    opens), all started together."""
    errors: list[BaseException] = []
    start = threading.Barrier(len(workers) + 1)

    def guarded(worker):
        try:
            worker(start)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            start.abort()

    threads = [threading.Thread(target=guarded, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return len(workers) * calls / elapsed


def main(args: Args) -> dict:
    floor = Floor()
    assert floor.run(TRIVIAL) == b"2\n"
    with PythonSandbox(pool_size=4) as sandbox:
        protections = sandbox.protections
        for _ in range(20):  # warm-up: page-in, pool full
            sandbox.run(TRIVIAL)
            floor.run(TRIVIAL)
        pace = args.pace_ms / 1e3
        per_round = max(1, args.calls // args.rounds)
        trivial, trivial_b2b, floor_paced, floor_b2b = [], [], [], []
        for _ in range(args.rounds):  # floor and sandbox alternate, sharing the host's load
            floor_b2b.append(time_calls(lambda: floor.run(TRIVIAL), per_round))
            trivial_b2b.append(time_calls(checked(lambda: sandbox.run(TRIVIAL)), per_round))
            floor_paced.append(time_calls(lambda: floor.run(TRIVIAL), per_round, pace))
            trivial.append(time_calls(checked(lambda: sandbox.run(TRIVIAL)), per_round, pace))
        sympy_ = time_calls(checked(lambda: sandbox.run(SYMPY)), args.calls // 2, pace)
        with sandbox.session() as s:
            s.run("import sympy as sp")
            session = time_calls(checked(lambda: s.run(TRIVIAL)), args.calls, pace)
            session_b2b = time_calls(checked(lambda: s.run(TRIVIAL)), args.calls)
        floors = [Floor() for _ in range(args.sessions)]
        floor_throughput(floors, 5)  # warm-up: the floor servers' first forks are slow
        concurrent_throughput(sandbox, args.sessions, 5)  # and the sandbox's pool refilled
        throughput_runs, floor_throughput_runs = [], []
        for _ in range(args.throughput_runs):  # alternating, as the latency rounds
            floor_throughput_runs.append(floor_throughput(floors, args.calls_per_session))
            throughput_runs.append(
                concurrent_throughput(sandbox, args.sessions, args.calls_per_session)
            )
        for f in floors:
            f.close()
    floor.close()
    throughput = statistics.median(throughput_runs)
    throughput_ratios = [a / f for a, f in zip(throughput_runs, floor_throughput_runs)]
    base_trivial = time_calls(lambda: subprocess_call(TRIVIAL), args.baseline_calls, pace)
    base_sympy = time_calls(lambda: subprocess_call(SYMPY), args.baseline_calls, pace)

    def round_medians(rounds: list[list[float]]) -> list[float]:
        return [statistics.median(r) * 1e3 for r in rounds]

    floor_b2b_rounds, floor_paced_rounds = round_medians(floor_b2b), round_medians(floor_paced)
    b2b_ratios = [a / f for a, f in zip(round_medians(trivial_b2b), floor_b2b_rounds)]
    # paced calls against the floor's cost of a call, back to back (which is lower, on this host,
    # than the floor's paced calls: the stricter comparison)
    paced_ratios = [a / f for a, f in zip(round_medians(trivial), floor_b2b_rounds)]
    trivial = [t for r in trivial for t in r]
    trivial_b2b = [t for r in trivial_b2b for t in r]
    (t50, t99), (s50, s99), (c50, c99) = map(percentiles, (trivial, sympy_, session))
    (tb50, tb99), (cb50, cb99) = map(percentiles, (trivial_b2b, session_b2b))
    (b50, b99), (bs50, bs99) = map(percentiles, (base_trivial, base_sympy))
    report = {
        "trivial_p50_ms": t50,
        "trivial_p99_ms": t99,
        "sympy_p50_ms": s50,
        "sympy_p99_ms": s99,
        "session_cell_p50_ms": c50,
        "session_cell_p99_ms": c99,
        "trivial_back_to_back_p50_ms": tb50,
        "trivial_back_to_back_p99_ms": tb99,
        "session_cell_back_to_back_p50_ms": cb50,
        "session_cell_back_to_back_p99_ms": cb99,
        "pace_ms": args.pace_ms,
        "floor_back_to_back_p50_ms": statistics.median(floor_b2b_rounds),
        "floor_paced_p50_ms": statistics.median(floor_paced_rounds),
        "back_to_back_vs_floor": statistics.median(b2b_ratios),
        "paced_vs_floor": statistics.median(paced_ratios),
        "back_to_back_vs_floor_rounds": b2b_ratios,
        "paced_vs_floor_rounds": paced_ratios,
        "subprocess_trivial_p50_ms": b50,
        "subprocess_trivial_p99_ms": b99,
        "subprocess_sympy_p50_ms": bs50,
        "subprocess_sympy_p99_ms": bs99,
        "trivial_speedup_vs_subprocess": b50 / t50,
        "sympy_speedup_vs_subprocess": bs50 / s50,
        "executions_per_s": throughput,
        "executions_per_s_runs": throughput_runs,
        "floor_executions_per_s": statistics.median(floor_throughput_runs),
        "floor_executions_per_s_runs": floor_throughput_runs,
        "throughput_vs_floor": statistics.median(throughput_ratios),
        "concurrent_sessions": args.sessions,
        "cpu_count": os.cpu_count(),
        "all_protections_on": all(protections.values()),
        "protections": protections,
    }
    if args.json:
        print(json.dumps(report))
    else:
        rows = [
            ("print(1+1), fresh session", t50, t99, b50, b99),
            ("sympy snippet, fresh session", s50, s99, bs50, bs99),
            ("print(1+1), cell in a session", c50, c99, b50, b99),
            ("print(1+1), fresh, back-to-back", tb50, tb99, b50, b99),
            ("print(1+1), cell, back-to-back", cb50, cb99, b50, b99),
        ]
        print(
            f"{'workload':32} {'sandbox p50':>12} {'p99':>8} {'subprocess p50':>15} {'p99':>8} "
            f"{'speed-up':>9}"
        )
        for name, a, a99, b, b99_ in rows:
            print(f"{name:32} {a:10.2f}ms {a99:6.1f}ms {b:13.1f}ms {b99_:6.1f}ms {b / a:8.1f}x")
        print(f"latency calls {args.pace_ms:g} ms apart unless back-to-back")
        print(
            f"floor (bare fork of a warm interpreter): back-to-back "
            f"{report['floor_back_to_back_p50_ms']:.2f} ms, paced "
            f"{report['floor_paced_p50_ms']:.2f} ms; sandbox/floor back-to-back "
            f"{report['back_to_back_vs_floor']:.2f}x, paced {report['paced_vs_floor']:.2f}x "
            f"(against the floor back-to-back; medians of {args.rounds} alternating rounds)"
        )
        print(
            f"throughput: {throughput:.0f} executions/s with {args.sessions} concurrent sessions "
            f"on {os.cpu_count()} cores (median of "
            f"{', '.join(f'{t:.0f}' for t in throughput_runs)}); the floor "
            f"{report['floor_executions_per_s']:.0f}/s, sandbox/floor "
            f"{report['throughput_vs_floor']:.2f}x"
        )
        off = [k for k, v in protections.items() if not v]
        print("protections: " + ("all on" if not off else "off: " + ", ".join(off)))
    return report


if __name__ == "__main__":
    main(tyro.cli(Args))
