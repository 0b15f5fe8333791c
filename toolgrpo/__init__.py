"""ToolGRPO: its packages are toolgrpo.envs, toolgrpo.agents and toolgrpo.learners.

In the source tree envs/, agents/ and learners/ are top-level folders, and toolgrpo/envs,
toolgrpo/agents, toolgrpo/learners are symlinks to them: the editable install (`uv sync`) puts the
repository's root on sys.path, where `toolgrpo.envs` resolves through the symlink. The wheel holds
real folders (pyproject.toml: `sources`). Import them as toolgrpo.*, never as `envs`: the root on
sys.path also makes `import envs` work, and a module imported under two names runs twice
(tests/test_package_names.py checks).
"""
