"""The packages load as toolgrpo.envs, toolgrpo.agents, toolgrpo.learners, under no other name.

The editable install puts the repository's root on sys.path, where the bare name `envs` imports
too; a module imported under two names runs twice, with two copies of each class.
tests/conftest.py's pytest_sessionfinish checks the same over the whole test session."""

import os
import pathlib
import subprocess
import sys

import pytest

WORKFLOW = """
import os, sys
import gymnasium as gym
import toolgrpo.agents.training, toolgrpo.envs, toolgrpo.envs.sandbox, toolgrpo.learners.train
env = gym.make("ToolMath-Arith-v0")
env.reset(seed=0)
tree = os.path.dirname(os.path.dirname(os.path.realpath(sys.modules["toolgrpo"].__file__)))
roots = tuple(os.path.join(tree, n) + os.sep for n in ("envs", "agents", "learners"))
print(sorted(name for name, m in list(sys.modules.items())
             if name.split(".")[0] != "toolgrpo" and name != "__main__"
             and os.path.realpath(getattr(m, "__file__", None) or "/").startswith(roots)))
print(type(env.unwrapped).__module__)
"""


def test_a_workflow_loads_every_module_under_toolgrpo_only():
    out = subprocess.run(
        [sys.executable, "-c", WORKFLOW],
        capture_output=True,
        text=True,
        timeout=300,
        cwd="/",
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["[]", "toolgrpo.envs.toolmath"], out.stdout


COEXIST = """
import importlib.metadata as md
import agents, toolgrpo.agents.rollout
from agents import Agent          # openai-agents' own top-level package, intact
top = sorted({f.parts[0] for f in md.distribution("toolgrpo").files}
             - {f"toolgrpo-{md.version('toolgrpo')}.dist-info"})
print(top)
print(agents.__name__, Agent.__module__.split(".")[0], toolgrpo.agents.rollout.Rollouts.__module__)
"""


@pytest.mark.slow
def test_the_installed_package_sits_beside_openai_agents(fresh_venv, tmp_path):
    """A fresh venv with openai-agents (whose top-level package is `agents`) and ToolGRPO installed
    in one resolve, as a user would: both import, and ToolGRPO's wheel owns nothing at the top
    level but toolgrpo/ and the Gymnasium plugin's two files."""
    root = pathlib.Path(__file__).resolve().parents[1]
    python = fresh_venv("coexist", "openai-agents>=0.2", str(root))
    outside = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    out = subprocess.run(
        [python, "-c", COEXIST],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=outside,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines() == [
        "['_toolgrpo_gymnasium.py', 'toolgrpo', 'toolgrpo_gymnasium.pth']",
        "agents agents toolgrpo.agents.rollout",
    ], out.stdout


def test_data_and_models_raise_the_one_hub_error_and_a_caller_catches_it_once():
    from toolgrpo import hub
    from toolgrpo.envs import problems
    from toolgrpo.learners import params

    assert problems.HubUnavailableError is params.HubUnavailableError is hub.HubUnavailableError
    with pytest.raises(params.HubUnavailableError) as err:
        problems.load_problems("no-such-owner/no-such-set")
    assert isinstance(err.value, ConnectionError) and "could not load" in err.value.reason
