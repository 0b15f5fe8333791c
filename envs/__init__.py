"""Tool-use environments for ToolGRPO, registered with Gymnasium.

    import gymnasium as gym
    env = gym.make("ToolMath-Arith-v0")
    env = gym.make("ToolMath-AIME-v0", problems="aime.jsonl")
    env = gym.make("ToolUse-v0", tools=["python", "search"], corpus="passages.jsonl",
                   problems=[...])            # several tools, a weighted mixture of sources

The installed package registers the ids whenever Gymnasium is imported (envs/gymnasium_plugin.py);
importing this package registers them too, for a source tree that is not installed.
This package imports neither jax nor any model code: environments are plain text in, text out.
"""

from gymnasium.envs.registration import register, registry

ENV_IDS = ("ToolMath-AIME-v0", "ToolMath-Arith-v0", "ToolUse-v0")

_ENTRY_POINTS = {
    "ToolMath-AIME-v0": (
        "toolgrpo.envs.toolmath:ToolMathEnv",
        {"problems": "aime", "split": "train"},
    ),
    "ToolMath-Arith-v0": (
        "toolgrpo.envs.toolmath:ToolMathEnv",
        {"problems": "arith", "difficulty": 3},
    ),
    "ToolUse-v0": ("toolgrpo.envs.tooluse:ToolUseEnv", {}),
}

for _id in ENV_IDS:
    if _id not in registry:
        _entry, _kwargs = _ENTRY_POINTS[_id]
        register(id=_id, entry_point=_entry, kwargs=_kwargs)
