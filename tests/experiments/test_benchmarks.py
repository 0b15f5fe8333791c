"""The benchmark scripts on a tiny budget: every figure their JSON documents is there, counts are
the counts asked for, derived figures agree with the ones they come from, and each measurement
is within what it can physically be (a latency is shorter than the whole run, a throughput is at
least the work done over the whole run).

No test here bounds a speed, a latency or a ratio of two timings: on a loaded machine those
measure the machine, not the code. Speed is what the benchmarks themselves report."""

import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def run_json(
    name: str, *args: str, timeout: int, python: str = sys.executable
) -> tuple[dict, float]:
    """The script's JSON report (run by `python`) and the run's wall time in seconds."""
    t0 = time.perf_counter()
    out = subprocess.run(
        [python, str(ROOT / "experiments" / name), *args, "--json"],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )
    wall_s = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout), wall_s


def memory_mb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20


SANDBOX_LATENCIES = (
    "trivial",
    "sympy",
    "session_cell",
    "trivial_back_to_back",
    "session_cell_back_to_back",
    "subprocess_trivial",
    "subprocess_sympy",
)
SANDBOX_KEYS = {f"{name}_{p}_ms" for name in SANDBOX_LATENCIES for p in ("p50", "p99")} | {
    "pace_ms",
    "trivial_speedup_vs_subprocess",
    "sympy_speedup_vs_subprocess",
    "executions_per_s",
    "executions_per_s_runs",
    "concurrent_sessions",
    "cpu_count",
    "all_protections_on",
    "protections",
    "floor_back_to_back_p50_ms",
    "floor_paced_p50_ms",
    "back_to_back_vs_floor",
    "paced_vs_floor",
    "back_to_back_vs_floor_rounds",
    "paced_vs_floor_rounds",
    "floor_executions_per_s",
    "floor_executions_per_s_runs",
    "throughput_vs_floor",
}


def test_bench_sandbox_json():
    calls, baseline_calls, sessions, calls_per_session = 10, 2, 2, 3
    report, wall_s = run_json(
        "bench_sandbox.py",
        "--calls",
        str(calls),
        "--baseline-calls",
        str(baseline_calls),
        "--sessions",
        str(sessions),
        "--calls-per-session",
        str(calls_per_session),
        timeout=300,
    )
    assert set(report) == SANDBOX_KEYS, set(report) ^ SANDBOX_KEYS
    wall_ms = wall_s * 1e3
    for name in SANDBOX_LATENCIES:
        p50, p99 = report[f"{name}_p50_ms"], report[f"{name}_p99_ms"]
        assert 0 < p50 <= p99 < wall_ms, (name, p50, p99, wall_ms)
    # the speedups are the ratios of the medians beside them
    for kind, base in (("trivial", "subprocess_trivial"), ("sympy", "subprocess_sympy")):
        speedup = report[f"{kind}_speedup_vs_subprocess"]
        assert speedup == pytest.approx(report[f"{base}_p50_ms"] / report[f"{kind}_p50_ms"])
    assert report["pace_ms"] == 10.0  # the default
    assert report["concurrent_sessions"] == sessions and report["cpu_count"] == os.cpu_count()
    runs = report["executions_per_s_runs"]
    assert len(runs) == 3 and report["executions_per_s"] == statistics.median(runs)
    # each throughput run executed sessions x calls_per_session cells within the whole run
    for rate in runs:
        assert sessions * calls_per_session / wall_s < rate, rate
    floor_runs = report["floor_executions_per_s_runs"]
    assert len(floor_runs) == 3
    assert report["floor_executions_per_s"] == statistics.median(floor_runs)
    assert all(sessions * calls_per_session / wall_s < rate for rate in floor_runs)
    assert report["throughput_vs_floor"] == pytest.approx(
        statistics.median(a / f for a, f in zip(runs, floor_runs))
    )
    protections = report["protections"]
    assert protections and all(isinstance(v, bool) for v in protections.values())
    assert report["all_protections_on"] is all(protections.values())


LEARNER_ROW_KEYS = {
    "batch",
    "seq_len",
    "rank",
    "jax_tokens_per_s",
    "jax_peak_mb",
    "jax_compile_s",
    "device",
    "torch_tokens_per_s",
    "torch_peak_mb",
    "speed_ratio",
    "memory_ratio",
}
LEARNER_GPU_KEYS = {"jax_device_peak_mb", "model_tflops", "mfu"}  # only on a GPU
LEARNER_HEADLINE = (
    "jax_tokens_per_s",
    "jax_peak_mb",
    "torch_tokens_per_s",
    "torch_peak_mb",
    "speed_ratio",
)


@pytest.mark.slow
def test_bench_learner_json():
    batch, seq_len = 2, 32
    report, wall_s = run_json(
        "bench_learner.py",
        "--shapes",
        "tiny",
        "--steps",
        "2",
        "--batch",
        str(batch),
        "--seq-len",
        str(seq_len),
        timeout=600,
    )
    assert set(report) == {"shapes", "headline_shape", "cpu_count", *LEARNER_HEADLINE}
    assert report["headline_shape"] == "tiny" and list(report["shapes"]) == ["tiny"]
    assert report["cpu_count"] == os.cpu_count()
    row = report["shapes"]["tiny"]
    assert set(row) - LEARNER_GPU_KEYS == LEARNER_ROW_KEYS, set(row) ^ LEARNER_ROW_KEYS
    assert (row["batch"], row["seq_len"], row["rank"]) == (batch, seq_len, 16)  # tiny's rank
    assert {k: report[k] for k in LEARNER_HEADLINE} == {k: row[k] for k in LEARNER_HEADLINE}
    assert isinstance(row["device"], str) and row["device"]
    # a timed step took less than the whole run, which ran both sides
    for side in ("jax", "torch"):
        assert row[f"{side}_tokens_per_s"] > batch * seq_len / wall_s, side
        # resident memory of a process that imported jax or torch: above 50 MB, within the RAM
        assert 50 < row[f"{side}_peak_mb"] < memory_mb(), side
    assert 0 < row["jax_compile_s"] < wall_s
    # the ratios are those of the figures beside them (step times; peak memory)
    assert row["speed_ratio"] == pytest.approx(row["jax_tokens_per_s"] / row["torch_tokens_per_s"])
    assert row["memory_ratio"] == pytest.approx(row["jax_peak_mb"] / row["torch_peak_mb"])


@pytest.mark.slow
def test_bench_learner_plan_json():
    """--plan compiles (runs nothing): every program a step of the config runs is there with its
    figures; the update's temporaries grow with the sequence at most linearly (8x the length,
    less than 12x the memory: [B, N, T, T] scores would grow 64x); the headline is the last
    shape's."""
    rows = {}
    for seq_len in (64, 512):
        report, wall_s = run_json(
            "bench_learner.py",
            "--plan",
            "--shapes",
            "tiny",
            "--batch",
            "4",
            "--seq-len",
            str(seq_len),
            "--ppo-epochs",
            "2",
            "--beta",
            "0.04",
            "--logprob-chunk",
            "128",
            "--attention-block",
            "64",
            timeout=600,
        )
        row = rows[seq_len] = report["shapes"]["tiny"]
        programs = ["update", "apply", "old_logprobs", "ref_logprobs"]
        assert row["programs"] == programs and row["layers"] == 2
        for program in programs:
            for figure in ("temp_gib", "argument_gib", "output_gib"):
                assert row[f"{program}_{figure}"] >= 0, (program, figure)
            assert 0 < row[f"{program}_compile_s"] < wall_s
        assert report["update_temp_gib"] == row["update_temp_gib"]
        assert report["compile_s"] == pytest.approx(
            row["lower_s"] + sum(row[f"{p}_compile_s"] for p in programs)
        )
        assert row["argument_gib"] > 0 and row["dtype"] == "bfloat16"
    assert (
        rows[64]["update_temp_gib"]
        < rows[512]["update_temp_gib"]
        < 12 * rows[64]["update_temp_gib"]
    ), (rows[64]["update_temp_gib"], rows[512]["update_temp_gib"])


@pytest.mark.slow
def test_bench_learner_plan_target_json(tpu_compile_python):
    """--plan --target tpu:v5e:2x2 compiles for the 4 chips of that slice (XLA's TPU compiler on
    this CPU, in the tpu-compile venv): the figures are per chip, beside the chip's 16 GiB, and a
    chip's arguments are a share of the whole (the state is sharded); the peak is the largest
    program's sum."""
    report, wall_s = run_json(
        "bench_learner.py",
        "--plan",
        "--target",
        "tpu:v5e:2x2",
        "--shapes",
        "tiny",
        "--batch",
        "4",
        "--seq-len",
        "64",
        timeout=600,
        python=tpu_compile_python,
    )
    row = report["shapes"]["tiny"]
    assert (row["target"], row["backend"], row["devices"]) == ("tpu:v5e:2x2", "tpu", 4)
    assert row["mesh"] == {"data": 1, "fsdp": 4} and row["hbm_gib"] == 16
    assert row["programs"] == ["update", "apply"]
    for program in row["programs"]:
        assert row[f"{program}_argument_gib"] > 0 and row[f"{program}_output_gib"] > 0
        assert 0 < row[f"{program}_compile_s"] < wall_s
    assert row["update_argument_gib"] < row["unsharded_argument_gib"] / 2
    assert row["peak_gib"] == pytest.approx(
        max(
            sum(row[f"{p}_{f}_gib"] for f in ("temp", "argument", "output"))
            for p in row["programs"]
        )
    )
    assert row["hbm_frac"] == pytest.approx(row["peak_gib"] / 16)


SAMPLER_KEYS = {
    "jax_tokens_per_s",
    "hf_tokens_per_s",
    "speed_ratio",
    "prompts",
    "prompt_len",
    "new_tokens",
    "repeats",
    "jax_threads",
    "torch_threads",
    "vllm_tokens_per_s",
    "vllm_ratio",
}


@pytest.mark.slow
def test_bench_sampler_json(vllm_python):
    prompts, prompt_len, new_tokens, repeats = 4, 8, 8, 3
    report, wall_s = run_json(
        "bench_sampler.py",
        "--prompts",
        str(prompts),
        "--prompt-len",
        str(prompt_len),
        "--new-tokens",
        str(new_tokens),
        "--repeats",
        str(repeats),
        "--vllm-python",
        vllm_python,
        timeout=900,
    )
    assert set(report) == SAMPLER_KEYS, set(report) ^ SAMPLER_KEYS
    assert (report["prompts"], report["prompt_len"], report["new_tokens"], report["repeats"]) == (
        prompts,
        prompt_len,
        new_tokens,
        repeats,
    )
    assert report["jax_threads"] >= 1 and report["torch_threads"] >= 1
    n_tokens = prompts * new_tokens
    for side in ("jax", "hf", "vllm"):  # each timed call was shorter than the whole run
        assert report[f"{side}_tokens_per_s"] > n_tokens / wall_s, side
    # the ratios are the same medians' ratios as the speeds
    assert report["speed_ratio"] == pytest.approx(
        report["jax_tokens_per_s"] / report["hf_tokens_per_s"], rel=1e-6
    )
    assert report["vllm_ratio"] == pytest.approx(
        report["jax_tokens_per_s"] / report["vllm_tokens_per_s"], rel=1e-6
    )


PIPELINE_KEYS = {
    "sync_steps_per_s",
    "pipelined_steps_per_s",
    "speedup",
    "mean_staleness",
    "sync_mean_staleness",
    "calibrated_update_s",
    "per_token_ms",
    "sync_collect_s",
    "sync_update_s",
    "pipelined_collect_s",
    "pipelined_update_s",
    "steps",
    "problems_per_step",
    "group_size",
    "new_tokens",
    "cpu_count",
    "device",
    "engine",
    "repeats",
    "speedup_runs",
    "sync_steps_per_s_runs",
    "pipelined_steps_per_s_runs",
}


@pytest.mark.slow
def test_bench_pipeline_json():
    steps, problems, group, tokens = 3, 4, 2, 16
    report, wall_s = run_json(
        "bench_pipeline.py",
        "--steps",
        str(steps),
        "--problems-per-step",
        str(problems),
        "--group-size",
        str(group),
        "--new-tokens",
        str(tokens),
        "--repeats",
        "1",
        timeout=600,
    )
    assert set(report) == PIPELINE_KEYS, set(report) ^ PIPELINE_KEYS
    assert (
        report["steps"],
        report["problems_per_step"],
        report["group_size"],
        report["new_tokens"],
        report["repeats"],
    ) == (steps, problems, group, tokens, 1)
    assert report["sync_steps_per_s_runs"] == [report["sync_steps_per_s"]]
    assert report["pipelined_steps_per_s_runs"] == [report["pipelined_steps_per_s"]]
    # one pair of runs: the speedup is its ratio
    assert report["speedup_runs"] == [report["speedup"]]
    assert report["speedup"] == pytest.approx(
        report["pipelined_steps_per_s"] / report["sync_steps_per_s"]
    )
    # the first pipelined batch is fresh, every later one one update old; the synchronous side's
    # batches are never old
    assert report["mean_staleness"] == pytest.approx((steps - 1) / steps)
    assert report["sync_mean_staleness"] == 0
    # the engine's latency was calibrated to the update: one round of `tokens` tokens a step
    assert report["per_token_ms"] == pytest.approx(report["calibrated_update_s"] * 1e3 / tokens)
    # each side's steps 2..steps ran within the whole run; the timed steps' collections and
    # updates were timed inside them: a synchronous step holds both, a pipelined one its update
    # (the learner's thread runs the updates one after another)
    for side in ("sync", "pipelined"):
        assert report[f"{side}_steps_per_s"] > (steps - 1) / wall_s, side
    sync_step = report["sync_collect_s"] + report["sync_update_s"]
    assert report["sync_steps_per_s"] * sync_step <= 1 + 1e-6
    assert report["pipelined_steps_per_s"] * report["pipelined_update_s"] <= 1 + 1e-6


SEARCH_KEYS = {
    "passages",
    "words_per_passage",
    "vocabulary",
    "k",
    "cores",
    "corpus_s",
    "date",
    "python",
    "versions",
    "bm25s",
}
SEARCH_ENGINE_KEYS = {
    "build_s",
    "load_s",
    "queries",
    "queries_found",
    "p50_ms",
    "p99_ms",
    "queries_per_s",
}


def test_bench_search_json():
    passages, queries = 2_000, 50
    report, wall_s = run_json(
        "bench_search.py",
        "--passages",
        str(passages),
        "--queries",
        str(queries),
        "--vocabulary",
        "3000",
        timeout=300,
    )
    assert set(report) == SEARCH_KEYS, set(report) ^ SEARCH_KEYS
    assert (report["passages"], report["k"], report["cores"]) == (passages, 3, 1)
    assert report["vocabulary"] == 3000 and set(report["versions"]) == {"bm25s"}
    bm25 = report["bm25s"]
    assert set(bm25) == SEARCH_ENGINE_KEYS, set(bm25) ^ SEARCH_ENGINE_KEYS
    # every query is words of a passage: each one finds something
    assert bm25["queries"] == bm25["queries_found"] == queries
    # the measurements lie within the run
    assert 0 < bm25["build_s"] + bm25["load_s"] + report["corpus_s"] < wall_s
    assert 0 < bm25["p50_ms"] <= bm25["p99_ms"] < wall_s * 1e3
    assert bm25["queries_per_s"] > queries / wall_s
