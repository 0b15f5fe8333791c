"""Bad input to the main job and to evaluate.py: one line on stderr, exit code 2, before the
model loads, and nothing written or deleted outside a run. The scripts' `main` runs in this
process (each case stops before anything is trained); tests/experiments/test_scripts.py runs them
as programs."""

import importlib.util
import json
import math
import os
import pathlib
import shutil
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(
        f"script_{name}", ROOT / "experiments" / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


AIME_GRPO = _script("aime_grpo")
EVALUATE = _script("evaluate")


def tiny_flags(model: str, train: str, test: str) -> list[str]:
    return [
        "--model.name",
        model,
        "--env.problems",
        train,
        "--env.eval-problems",
        test,
        "--sampler.engine",
        "jax",
        "--log.no-wandb",
        "--steps",
        "1",
        "--problems-per-step",
        "2",
        "--rollout.group-size",
        "2",
        "--grpo.micro-batch-size",
        "2",
        "--model.lora-rank",
        "4",
        "--rollout.max-turn-tokens",
        "12",
        "--rollout.max-total-tokens",
        "512",
        "--eval.samples",
        "2",
    ]


def refused(capsys, run) -> str:
    """The one line `run()` ends with (exit code 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run()
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1, lines
    assert "rollouts:" not in captured.out  # stopped before the sampler
    return lines[0]


def main_job_refuses(capsys, *argv: str) -> str:
    return refused(capsys, lambda: AIME_GRPO.main(list(argv)))


def evaluate_refuses(capsys, *argv: str) -> str:
    def run():
        with AIME_GRPO.one_line_errors():
            args = AIME_GRPO.load_config(list(argv), EVALUATE.Args)
        EVALUATE.main(args)

    return refused(capsys, run)


def snapshot(directory) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in pathlib.Path(directory).rglob("*")
        if p.is_file()
    }


def a_run_directory(path: pathlib.Path) -> pathlib.Path:
    """What a run writes first (RunLog): its settings as config.json."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"out": str(path), "steps": 1, "seed": 0}))
    (path / "metrics.jsonl").write_text('{"step": 1}\n')
    return path


def test_overwrite_never_deletes_a_directory_that_is_not_a_run(
    tiny_model_dir, problem_files, tmp_path, capsys
):
    # make_tiny.py's directory, the model and problems the run is about to load
    inputs = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir, inputs / "model")
    for path in problem_files:
        shutil.copy(path, inputs)
    before = snapshot(inputs)
    flags = tiny_flags(
        str(inputs / "model"), *(str(inputs / os.path.basename(p)) for p in problem_files)
    )
    for extra in ([], ["--overwrite"]):
        line = main_job_refuses(capsys, *flags, "--out", str(inputs), *extra)
        assert "holds no run of this project (model, " in line, line
        assert "--overwrite replaces only a run directory" in line
    assert snapshot(inputs) == before


def test_overwrite_never_deletes_a_run_that_holds_an_input_or_the_current_directory(
    tiny_model_dir, problem_files, tmp_path, capsys, monkeypatch
):
    run = a_run_directory(tmp_path / "run")
    shutil.copy(problem_files[0], run / "train.jsonl")
    (tmp_path / "my.yaml").write_text("steps: 1\n")
    flags = tiny_flags(tiny_model_dir, str(run / "train.jsonl"), problem_files[1])
    before = snapshot(run)
    line = main_job_refuses(capsys, *flags, "--out", str(run), "--overwrite")
    assert f"--overwrite of {run} would delete {run / 'train.jsonl'}" in line, line
    # a config file inside the run is an input too
    shutil.copy(tmp_path / "my.yaml", run / "my.yaml")
    before = snapshot(run)
    flags = tiny_flags(tiny_model_dir, *problem_files)
    line = main_job_refuses(
        capsys, "--config", str(run / "my.yaml"), *flags, "--out", str(run), "--overwrite"
    )
    assert f"would delete {run / 'my.yaml'}" in line, line
    monkeypatch.chdir(run / ".")
    line = main_job_refuses(capsys, *flags, "--out", ".", "--overwrite")
    assert "would delete the current directory" in line, line
    assert snapshot(run) == before
    # without --overwrite a run is refused with the three ways on
    line = main_job_refuses(capsys, *flags, "--out", str(run))
    assert "already holds a run" in line and "--resume" in line and "--overwrite" in line


def test_an_out_that_cannot_be_a_run_directory_is_one_line(
    tiny_model_dir, problem_files, tmp_path, capsys
):
    flags = tiny_flags(tiny_model_dir, *problem_files)
    (tmp_path / "a-file").write_text("mine\n")
    cases = [
        (str(tmp_path / "a-file"), "is a file, not a directory"),
        ("/proc/x", "cannot make the directory"),
        ("", "--out is empty"),
    ]
    for out, message in cases:
        assert message in main_job_refuses(capsys, *flags, "--out", out)
    assert (tmp_path / "a-file").read_text() == "mine\n"


SETTINGS = [  # (flags, what the one line says)
    (["--grpo.learning-rate", "nan"], "--grpo.learning-rate is nan: every numeric setting"),
    (["--grpo.max-grad-norm", "inf"], "--grpo.max-grad-norm is inf"),
    (["--env.tool-timeout-s", "nan"], "--env.tool-timeout-s is nan"),
    (["--rollout.temperature", "-1"], "got temperature -1.0"),
    (["--rollout.temperature", "nan"], "got temperature nan"),
    (["--rollout.top-p", "0"], "top_p 0.0"),
    (["--rollout.top-p", "1.5"], "top_p 1.5"),
    (["--rollout.top-k", "-1"], "top_k -1"),
    (["--problems-per-step", "300"], "--problems-per-step 300 is more than the 4 training"),
    (["--dist.data", "3"], "mesh data=3 must divide the 1 devices"),
    (["--sampler.vllm-url", "not-a-url"], "'not-a-url' is not an http(s) URL"),
    (["--sampler.vllm-url", "http://127.0.0.1:1"], "no vLLM server answers there"),
    (["--rollout.max-total-tokens", "4096"], "is more than the model's 1024 positions"),
    (["--health.window", "0"], "health.window and health.patience must be >= 1, got 0, 2"),
    (["--health.dead-batch", "1.5"], "health.dead_batch must be in (0, 1], got 1.5"),
]


@pytest.mark.parametrize("flags,message", SETTINGS, ids=[" ".join(f) for f, _ in SETTINGS])
def test_bad_settings_are_one_line_and_write_nothing(
    flags, message, tiny_model_dir, problem_files, tmp_path, capsys
):
    out = tmp_path / "run"
    line = main_job_refuses(
        capsys, *tiny_flags(tiny_model_dir, *problem_files), "--out", str(out), *flags
    )
    assert message in line, line
    assert not out.exists()


def test_vllm_not_installed_names_the_extra(tiny_model_dir, problem_files, tmp_path, capsys):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    flags = tiny_flags(tiny_model_dir, *problem_files)
    line = main_job_refuses(
        capsys, *flags, "--out", str(tmp_path / "r"), "--sampler.engine", "vllm"
    )
    assert "vLLM is not installed" in line and "uv sync --extra vllm" in line


def broken_models(tiny_model_dir, root: pathlib.Path) -> list[tuple[str, str]]:
    """Copies of the tiny model, each broken one way: (directory, what the one line says)."""
    from safetensors.numpy import load_file, save_file
    from transformers import AutoTokenizer

    def copy(name: str) -> pathlib.Path:
        return pathlib.Path(shutil.copytree(tiny_model_dir, root / name))

    cases = []
    no_tokenizer = copy("no-tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    cases.append((no_tokenizer, "no tokenizer.json"))
    no_template = copy("no-template")
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        (no_template / name).unlink(missing_ok=True)
    cases.append((no_template, "has no chat template"))
    other = copy("other-tokenizer")
    tokens = len(AutoTokenizer.from_pretrained(tiny_model_dir) or ())
    config = json.loads((other / "config.json").read_text())
    assert config["vocab_size"] >= tokens > 0
    config["vocab_size"] = 2 * tokens  # the embedding of another vocabulary
    (other / "config.json").write_text(json.dumps(config))
    cases.append((other, f"the tokenizer has {tokens} tokens but the model's embedding"))
    weights = (pathlib.Path(tiny_model_dir) / "model.safetensors").read_bytes()
    truncated = copy("truncated")
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    cases.append((truncated, "model.safetensors is truncated or corrupt"))
    corrupt = copy("corrupt")
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 8 + weights[8:])
    cases.append((corrupt, "model.safetensors is truncated or corrupt"))
    nan = copy("nan")
    tensors = load_file(str(nan / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name] = tensors[name].copy()
    tensors[name].flat[5] = np.nan
    save_file(tensors, str(nan / "model.safetensors"), metadata={"format": "pt"})
    cases.append((nan, f"tensor '{name}' holds NaN or inf values"))
    return [(str(d), m) for d, m in cases]


def test_broken_models_are_one_line_and_write_nothing(
    tiny_model_dir, problem_files, tmp_path, capsys
):
    for i, (model, message) in enumerate(broken_models(tiny_model_dir, tmp_path / "models")):
        out = tmp_path / f"run{i}"
        line = main_job_refuses(capsys, *tiny_flags(model, *problem_files), "--out", str(out))
        assert message in line, (model, line)
        assert not out.exists() or not os.listdir(out), os.listdir(out)


def test_evaluate_runs_the_main_jobs_checks(tiny_model_dir, problem_files, tmp_path, capsys):
    from flax import nnx
    from safetensors.numpy import load_file, save_file

    from toolgrpo.learners.lora import apply_lora, save_peft_adapter
    from toolgrpo.learners.params import from_pretrained

    base = ["--model", tiny_model_dir, "--problems", problem_files[1], "--k", "1"]
    budget = ["--rollout.max-total-tokens", "512", "--rollout.max-turn-tokens", "12"]
    budget += ["--rollout.group-size", "2"]
    # the README's tiny model with evaluate.py's default budget
    assert "more than the model's 1024 positions" in evaluate_refuses(capsys, *base)
    missing = evaluate_refuses(capsys, *base, *budget, "--adapter", str(tmp_path / "nope"))
    assert f"--adapter {tmp_path / 'nope'} is not a directory" in missing
    model = apply_lora(from_pretrained(tiny_model_dir), rank=4, alpha=8, rngs=nnx.Rngs(1))
    adapter = tmp_path / "adapter"
    save_peft_adapter(model, str(adapter))
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    key = sorted(tensors)[0]
    tensors[key] = np.full_like(tensors[key], np.nan)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    line = evaluate_refuses(capsys, *base, *budget, "--adapter", str(adapter))
    assert f"adapter tensor '{key}' holds NaN or inf values" in line, line
    (adapter / "adapter_config.json").unlink()
    assert "has no adapter_config.json" in evaluate_refuses(
        capsys, *base, *budget, "--adapter", str(adapter)
    )
    for model_dir, message in broken_models(tiny_model_dir, tmp_path / "models")[:3]:
        assert message in evaluate_refuses(
            capsys, "--model", model_dir, "--problems", problem_files[1], "--k", "1", *budget
        )
    line = evaluate_refuses(
        capsys, "--endpoint", "http://127.0.0.1:1", "--tokenizer", tiny_model_dir, "--k", "1"
    )
    assert "--endpoint http://127.0.0.1:1: no vLLM server answers there" in line, line


def test_check_finite_names_every_non_finite_float():
    from toolgrpo.agents.training.checks import check_finite

    check_finite({"a": 1.0, "b": {"c": 0.0, "d": "nan", "e": None, "f": 3}})
    for value in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match=r"--b\.sub-key is"):
            check_finite({"a": 1.0, "b": {"sub_key": value}})
