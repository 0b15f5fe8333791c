import json
import os
import re
import subprocess

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

import toolgrpo.envs
from toolgrpo.envs.problems import Problem
from toolgrpo.envs.rewards import RewardWeights

FENCE = "```"


def code(src: str) -> str:
    return f"Let me compute.\n{FENCE}python\n{src}\n{FENCE}\n"


@pytest.fixture
def aime_file(tmp_path):
    path = tmp_path / "aime.jsonl"
    rows = [
        {"problem": "What is 6 times 7?", "answer": "42"},
        {"problem": "What is 2 to the 10th, mod 1000?", "answer": "24"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def make(env_id, aime_file, **kwargs):
    if env_id == "ToolMath-AIME-v0":
        kwargs.setdefault("problems", aime_file)
    return gym.make(env_id, **kwargs)


@pytest.mark.parametrize("env_id", toolgrpo.envs.ENV_IDS)
def test_check_env_on_every_registered_id(env_id, aime_file):
    env = make(env_id, aime_file)
    check_env(env.unwrapped, skip_render_check=False)
    env.close()


OUTSIDE = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
"""The environment of a program outside the repo: no PYTHONPATH, no active venv."""


@pytest.mark.slow
def test_an_installed_package_registers_its_ids_in_any_program(
    tmp_path, aime_file, installed_python
):
    """A fresh venv with the built wheel: plain gym.make("ToolMath-...") from outside the repo."""
    python = installed_python
    venv = os.path.dirname(os.path.dirname(python))
    script = (
        "import sys\n"
        "print('gymnasium' in sys.modules)\n"  # the start-up hook imports nothing
        "import gymnasium as gym\n"
        f"env = gym.make('ToolMath-AIME-v0', problems={aime_file!r})\n"
        "obs, info = env.reset(seed=0)\nprint(info['problem_id'])\n"
        "env = gym.make('ToolMath-Arith-v0')\nobs, info = env.reset(seed=0)\n"
        "print(type(env.unwrapped).__module__, sys.modules['toolgrpo.envs'].__file__)"
    )
    out = subprocess.run(
        [python, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=OUTSIDE,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "False"
    assert "aime.jsonl#" in lines[1]
    module, origin = lines[2].split()
    assert module == "toolgrpo.envs.toolmath" and origin.startswith(str(venv)), lines[2]


def test_an_episode_with_a_tool_call_and_a_right_answer(aime_file):
    env = make("ToolMath-AIME-v0", aime_file)
    obs, info = env.reset(options={"index": 0})
    assert obs.startswith("What is 6 times 7?") and "\\boxed{}" in obs
    assert [m["role"] for m in info["messages"]] == ["system", "user"]
    assert "```python" in info["messages"][0]["content"] and info["stop"]
    obs, reward, term, trunc, info = env.step(code("x = 6 * 7\nprint(x)"))
    assert obs == "```output\n42\n```\n" and (reward, term, trunc) == (0.0, False, False)
    obs, reward, term, trunc, info = env.step(code("print(x + 1)"))  # state persists
    assert obs == "```output\n43\n```\n"
    obs, reward, term, trunc, info = env.step("So the answer is \\boxed{42}.")
    assert (obs, term, trunc) == ("", True, False)
    assert info["correct"] and info["answer"] == "42" and info["gold_answer"] == "42"
    assert info["reward_components"] == {"correctness": 1.0, "format": 1.0, "tool_use": 1.0}
    assert reward == pytest.approx(1.2)
    assert info["tool"] == {
        "calls": 2,
        "ok": 2,
        "errors": 0,
        "timeouts": 0,
        "parse_failures": 0,
        "crashes": 0,
    }
    transcript = info["messages"][-1]["content"]
    assert transcript.count("```output") == 2 and transcript.endswith("\\boxed{42}.")
    with pytest.raises(RuntimeError, match="reset"):
        env.step("again")


def test_wrong_answer_without_tools_gets_only_the_format_reward(aime_file):
    env = make("ToolMath-AIME-v0", aime_file, reward_weights=RewardWeights(1.0, 0.25, 0.5))
    env.reset(options={"index": 0})
    _, reward, term, _, info = env.step("I think it is \\boxed{41}.")
    assert term and not info["correct"] and reward == pytest.approx(0.25)
    env.reset(options={"index": 0})
    _, reward, term, _, info = env.step("Probably forty-two.")
    assert term and info["answer"] is None and reward == 0.0


def test_tool_errors_timeouts_and_garbage_are_observations(aime_file):
    env = make("ToolMath-AIME-v0", aime_file, max_turns=10, tool_timeout_s=1)
    env.reset(options={"index": 1})
    obs, *_, info = env.step(code("1/0"))
    assert "ZeroDivisionError" in obs and 'File "<cell 1>", line 1' in obs
    obs, *_, info = env.step(code("while True: pass"))
    assert "timed out" in obs
    obs, *_ = env.step(f"{FENCE}python\n\n{FENCE}\n")
    assert "empty" in obs
    obs, *_, info = env.step(code("print('x' * 100000)"))
    assert len(obs) < 2200 and "omitted" in obs
    assert info["tool"] == {
        "calls": 3,
        "ok": 1,
        "errors": 1,
        "timeouts": 1,
        "parse_failures": 1,
        "crashes": 0,
    }
    for garbage in ("", "\x00\ud800 \u202e", "{" * 10000):
        env.reset(options={"index": 1})
        obs, reward, term, _trunc, _ = env.step(garbage)
        assert term and reward == 0.0


def test_truncation_at_the_turn_and_character_limits(aime_file):
    env = make("ToolMath-AIME-v0", aime_file, max_turns=2)
    env.reset(options={"index": 0})
    _, _, term, trunc, _ = env.step(code("print(1)"))
    assert not (term or trunc)
    obs, reward, term, trunc, info = env.step(code("print(2)"))
    assert trunc and not term and obs == "```output\n2\n```\n"
    assert info["answer"] is None and info["reward_components"]["tool_use"] == 1.0
    assert reward == pytest.approx(0.1)
    env = make("ToolMath-AIME-v0", aime_file, max_chars=200, max_turns=50)
    env.reset(options={"index": 0})
    _, _, _, trunc, _ = env.step(code("print('y' * 300)"))
    assert trunc


def test_qwen_protocol_messages_are_chat_form_tool_calls(aime_file):
    """Hugging Face's chat form (what chat templates render): arguments as a mapping."""
    env = make("ToolMath-AIME-v0", aime_file, protocol="qwen")
    obs, info = env.reset(options={"index": 0})
    assert info["stop"] == ["</tool_call>"] and info["tools"][0]["function"]["name"] == "python"
    call = json.dumps({"name": "python", "arguments": {"code": "print(6 * 7)"}})
    obs, *_, info = env.step(f"Compute.\n<tool_call>\n{call}\n</tool_call>")
    assert obs == "42"
    assistant, tool = info["messages"][-2:]
    assert assistant["content"] == "Compute."  # the template puts the newline back
    assert assistant["tool_calls"][0]["function"]["arguments"] == {"code": "print(6 * 7)"}
    assert tool == {
        "role": "tool",
        "tool_call_id": assistant["tool_calls"][0]["id"],
        "content": "42",
    }
    obs, *_ = env.step("<tool_call>{broken</tool_call>")
    assert "not valid JSON" in obs
    _, _reward, term, _, info = env.step("\\boxed{42}")
    assert term and info["correct"] and info["tool"]["parse_failures"] == 1


def test_reset_is_deterministic_for_a_seed_and_validates_the_index():
    env = gym.make("ToolMath-Arith-v0")
    first = [env.reset(seed=s)[1]["problem_id"] for s in (1, 2, 3)]
    again = [env.reset(seed=s)[1]["problem_id"] for s in (1, 2, 3)]
    assert first == again and len(set(first)) == 3
    with pytest.raises(IndexError):
        gym.make("ToolMath-AIME-v0", problems=[Problem("p", "q", "1")]).reset(options={"index": 5})


def test_close_releases_the_episode_session(aime_file):
    env = make("ToolMath-AIME-v0", aime_file)
    env.reset(options={"index": 0})
    env.step(code("x = 1"))
    session = env.unwrapped._session
    assert session is not None and not session.closed
    env.close()
    assert session.closed and env.unwrapped._session is None


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="max_turns"):
        gym.make("ToolMath-Arith-v0", max_turns=0)
    with pytest.raises(ValueError, match="protocol"):
        gym.make("ToolMath-Arith-v0", protocol="xml")
    env = gym.make("ToolMath-Arith-v0")
    env.reset(seed=0)
    with pytest.raises(TypeError, match="text"):
        env.unwrapped.step(123)


def test_a_long_traceback_is_cut_to_its_last_lines(aime_file):
    """A failure 16 distinct calls deep: the model sees the header, the cut, the last
    traceback_lines lines (the exception last); a short traceback (one frame) is left whole;
    None: whole."""
    deep = "\n".join(f"def f{i}():\n    return f{i + 1}()" for i in range(15))
    deep += "\ndef f15():\n    return 1 / 0\nf0()"
    env = make("ToolMath-AIME-v0", aime_file, max_turns=10, traceback_lines=4)
    env.reset(options={"index": 1})
    obs, *_ = env.step(code(deep))
    body = obs.split("```output\n", 1)[1].rsplit("\n```", 1)[0].split("\n")
    assert body[0] == "Traceback (most recent call last):" and len(body) == 6, obs
    assert re.fullmatch(r"\[\.\.\. \d+ lines cut \.\.\.\]", body[1]), obs
    assert body[-1] == "ZeroDivisionError: division by zero"
    obs, *_ = env.step(code("1/0"))
    assert "lines cut" not in obs and 'File "<cell 2>", line 1' in obs
    whole = make("ToolMath-AIME-v0", aime_file, traceback_lines=None)
    whole.reset(options={"index": 1})
    obs, *_ = whole.step(code(deep))
    assert "lines cut" not in obs and obs.count('File "<cell 1>"') == 17
    with pytest.raises(ValueError, match="traceback_lines"):
        make("ToolMath-AIME-v0", aime_file, traceback_lines=0)
