"""Tool-use environments for ToolGRPO, registered with Gymnasium.

    import gymnasium as gym
    env = gym.make("ToolMath-Arith-v0")
    env = gym.make("ToolMath-AIME-v0", problems="aime.jsonl")

The installed package registers the ids whenever Gymnasium is imported (envs/gymnasium_plugin.py);
importing this package registers them too, for a source tree that is not installed.
This package imports neither jax nor any model code: environments are plain text in, text out.
"""

from gymnasium.envs.registration import register, registry

ENV_IDS = ("ToolMath-AIME-v0", "ToolMath-Arith-v0")

_KWARGS = {
    "ToolMath-AIME-v0": {"problems": "aime", "split": "train"},
    "ToolMath-Arith-v0": {"problems": "arith", "difficulty": 3},
}

for _id in ENV_IDS:
    if _id not in registry:
        register(id=_id, entry_point="toolgrpo.envs.toolmath:ToolMathEnv", kwargs=_KWARGS[_id])
