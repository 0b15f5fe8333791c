"""Registers ToolGRPO's environments the moment Gymnasium is imported, in any program.

Gymnasium 1.x discovers no plugins (0.x read the `gymnasium.envs` entry points; 1.0 dropped them),
so `gym.make("ToolMath-AIME-v0")` would fail in another project until something imported `toolgrpo.envs`.
The installed package therefore ships `toolgrpo_gymnasium.pth`, a one-line start-up file that
imports this module, which the wheel places at the top level as `_toolgrpo_gymnasium`. It uses
the standard library only and imports nothing at start-up: it puts a finder in front of
`sys.meta_path` that, once Gymnasium's `gymnasium.envs` has loaded, imports `toolgrpo.envs`, whose import
registers the ids (with string entry points: the environments' code loads at `gym.make`).

An editable install holds a copy of this file: after editing it, run
`uv sync --reinstall-package toolgrpo`.
"""

from __future__ import annotations

import sys

_TRIGGER = "gymnasium.envs"


class _RegisterAfterLoad:
    """Gymnasium's own loader for `gymnasium.envs`, followed by `import toolgrpo.envs`."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):  # get_resource_reader, is_package, ...: Gymnasium's loader answers
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        _register()


class _GymnasiumFinder:
    """Finds nothing itself: wraps the loader of `gymnasium.envs`, then leaves `sys.meta_path`."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TRIGGER:
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    # a stand-in, not an importlib.abc.Loader: the rest it forwards to Gymnasium's
                    spec.loader = _RegisterAfterLoad(spec.loader)  # ty: ignore[invalid-assignment]
                return spec
        return None


def _register() -> None:
    try:
        __import__("toolgrpo.envs")
    # a broken install must not break every program that uses Gymnasium
    except Exception as exc:  # noqa: BLE001 - reported below, whatever it is
        # This runs when the program imports Gymnasium, in its logging setup or in none: then
        # logging's last-resort handler writes a warning to stderr. `logging` is imported here,
        # so that the start-up hook imports nothing into every interpreter.
        import logging

        logging.getLogger(__name__).warning(
            "toolgrpo: its Gymnasium environments are not registered: %r", exc
        )


def install() -> None:
    """Run by `toolgrpo_gymnasium.pth` at interpreter start-up."""
    if _TRIGGER in sys.modules:
        _register()
    elif not any(isinstance(f, _GymnasiumFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _GymnasiumFinder())
