"""Each experiment script runs end to end on a tiny budget."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def run_script(name: str, *args: str, stdin: str | None = None, timeout: int = 300) -> str:
    out = subprocess.run([sys.executable, str(ROOT / "experiments" / name), *args], input=stdin,
                         capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_bench_sandbox_json():
    report = json.loads(run_script("bench_sandbox.py", "--calls", "10", "--baseline-calls", "2",
                                   "--sessions", "2", "--calls-per-session", "3", "--json"))
    for key in ("trivial_p50_ms", "trivial_speedup_vs_subprocess", "sympy_p50_ms",
                "sympy_speedup_vs_subprocess", "executions_per_s"):
        assert report[key] > 0, key
    assert report["sympy_speedup_vs_subprocess"] > 1  # a warm sympy beats importing it


def test_play_an_episode_by_hand():
    turns = "```python\nprint(2 + 3)\n```\n.\nSo \\boxed{5}.\n.\n"
    out = run_script("play.py", "--seed", "3", stdin=turns)
    assert "```output\n5\n```" in out and "episode over (final answer)" in out


def test_bench_learner_json():
    report = json.loads(run_script("bench_learner.py", "--shapes", "tiny", "--steps", "2",
                                   "--batch", "2", "--seq-len", "32", "--json", timeout=600))
    for key in ("jax_tokens_per_s", "torch_tokens_per_s", "speed_ratio", "jax_peak_mb",
                "torch_peak_mb"):
        assert report[key] > 0, key


def test_bench_sampler_json():
    report = json.loads(run_script("bench_sampler.py", "--prompts", "4", "--prompt-len", "8",
                                   "--new-tokens", "8", "--json", timeout=600))
    for key in ("jax_tokens_per_s", "hf_tokens_per_s", "speed_ratio"):
        assert report[key] > 0, key
