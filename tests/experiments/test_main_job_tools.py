"""The main job on ToolUse-v0: python and search over a weighted mixture of a math source and a QA
source (a real bm25s index of a corpus written here), from a config file; its metrics per
source and per tool; bad tool settings as one line before the model loads."""

import json

import pytest
import yaml
from script_runs import read_jsonl, run_script
from test_bad_input import main_job_refuses, tiny_flags


@pytest.fixture
def tool_inputs(tmp_path, problem_files, monkeypatch):
    """A corpus, a QA file and the config file of a two-source mixture (math from the tiny
    problem files, expecting python; QA expecting search)."""
    monkeypatch.setenv("TOOLGRPO_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.jsonl"
    qa = tmp_path / "qa.jsonl"
    names = ["Zorblax", "Mirutea", "Kalovia", "Tepazu"]
    with open(corpus, "w") as c, open(qa, "w") as q:
        for i, name in enumerate(names):
            text = f"The registry code of {name} is Q{i:05d}."
            c.write(json.dumps({"id": f"e{i}", "title": name, "text": text}) + "\n")
            question = f"What is the registry code of {name}?"
            q.write(json.dumps({"question": question, "answer": f"Q{i:05d}"}) + "\n")
    train, test = problem_files
    env = {
        "env_id": "ToolUse-v0",
        "tools": ["python", "search"],
        "corpus": str(corpus),
        "sources": [
            {
                "name": "math",
                "problems": train,
                "eval_problems": test,
                "expected_tools": ["python"],
            },
            {
                "name": "qa",
                "problems": str(qa),
                "eval_problems": str(qa),
                "weight": 2.0,
                "expected_tools": ["search"],
                "answer_kind": "text",
            },
        ],
        "rewards": {"selection": 0.1, "bad_call": -0.05},
    }
    config = tmp_path / "tools.yaml"
    config.write_text(yaml.safe_dump({"env": env}))
    return config, corpus, qa


def without_problem_files(flags: list[str]) -> list[str]:
    """tiny_flags less --env.problems and --env.eval-problems (the sources replace them)."""
    out, skip = [], False
    for flag in flags:
        if skip:
            skip = False
        elif flag in ("--env.problems", "--env.eval-problems"):
            skip = True
        else:
            out.append(flag)
    return out


@pytest.mark.slow
def test_a_mixed_source_run_logs_metrics_per_source_and_per_tool(
    tiny_model_dir, problem_files, tool_inputs, tmp_path
):
    config, _, _ = tool_inputs
    out = tmp_path / "run"
    flags = without_problem_files(tiny_flags(tiny_model_dir, *problem_files))
    flags += ["--rollout.max-total-tokens", "1024", "--eval.every", "2"]
    run_script(
        "aime_grpo.py",
        "--config",
        str(config),
        *flags,
        "--steps",
        "2",
        "--out",
        str(out),
        timeout=600,
    )
    records = read_jsonl(out / "metrics.jsonl")
    train = [r for r in records if "train/reward" in r]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:  # the tiny random model's episodes, whatever it writes
        assert {"train/source/math/accuracy", "train/source/qa/accuracy"} <= r.keys()
        assert 0 <= r["train/selection_accuracy"] <= 1 and "train/reward/selection" in r
        assert "train/reward/search_ran" in r and "train/reward/retrieval_hit" in r
    evals = [r for r in records if "eval/pass@1" in r]
    assert evals and all("eval/source/qa/selection_accuracy" in r for r in evals)
    saved = json.loads((out / "config.json").read_text())
    assert [s["name"] for s in saved["env"]["sources"]] == ["math", "qa"]
    report = json.loads(
        run_script(
            "evaluate.py",
            *("--model", tiny_model_dir, "--adapter", str(out / "adapter")),
            *("--env-config", str(out / "config.json"), "--limit", "3", "--k", "1"),
            *("--rollout.group-size", "2", "--rollout.max-turn-tokens", "12"),
            *("--rollout.max-total-tokens", "1024", "--json"),
        )
    )
    assert report["env_id"] == "ToolUse-v0" and report["problems"] == 3
    assert 0 <= report["selection_accuracy"] <= 1  # both sources name their expected tool
    sources = {k.split("/")[1] for k in report if k.startswith("source/")}
    assert sources and sources <= {"math", "qa"}
    assert json.loads((out / "problem_files.json").read_text()).keys() >= {
        "corpus",
        "sources.qa.problems",
        "sources.math.eval_problems",
    }


def test_bad_tool_settings_are_one_line(
    tiny_model_dir, problem_files, tool_inputs, tmp_path, capsys
):
    config, corpus, qa = tool_inputs
    flags = without_problem_files(tiny_flags(tiny_model_dir, *problem_files))
    run = ["--config", str(config), *flags, "--out", str(tmp_path / "run")]
    line = main_job_refuses(capsys, *run, "--env.tools", "python", "calculator")
    assert "unknown tool 'calculator'" in line
    line = main_job_refuses(capsys, *run, "--env.corpus", str(tmp_path / "gone.jsonl"))
    assert "search corpus" in line and "gone.jsonl' does not exist" in line
    qa.write_text(json.dumps({"question": "What is the code of Zorblax?", "answer": ""}) + "\n")
    line = main_job_refuses(capsys, *run)
    assert "row 0" in line and "has no usable answer" in line
    line = main_job_refuses(capsys, *run, "--env.problems", str(qa))
    assert "give ToolUse-v0 env.sources or env.problems, not both" in line
    bad = yaml.safe_load(config.read_text())
    bad["env"]["sources"][0]["weight"] = "heavy"
    config.write_text(yaml.safe_dump(bad))
    line = main_job_refuses(capsys, *run)
    assert "env.sources[0].weight is 'heavy', expected float" in line
    assert not (tmp_path / "run").exists()
