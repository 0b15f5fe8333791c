"""The command-line layer of the experiments: settings from defaults, a YAML/JSON file and flags
(tyro), and bad input as one line on stderr with exit code 2.

    cfg = load_config(sys.argv[1:], Config, description=__doc__)
    with one_line_errors(debug=cfg.debug): ...
    with one_line_faults(debug=cfg.debug):       # non-finite updates, a full disk: one line
        exit_cleanly_when_offline(lambda: train(cfg), OFFLINE_HINT)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agents.training.config import config_from_dict

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


def fail(message: str):
    """End the program with `message` as one line on stderr and exit code 2 (bad input)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def load_config(
    argv: list[str], cls: type[DataclassInstance], default: Any = None, description: str = ""
) -> Any:
    """Defaults, then a YAML/JSON file (--config PATH or --config=PATH), then flags. A file nests
    as the config does: `steps: 50` at the top, `grpo: {eps_high: 0.3}` for a section."""
    import tyro

    argv = [x for a in argv for x in (a.split("=", 1) if a.startswith("--config=") else [a])]
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            fail("--config needs a path to a YAML or JSON file")
        path, argv = argv[i + 1], argv[:i] + argv[i + 2 :]
        default = read_config_file(path, cls, cls() if default is None else default)
        if "config_file" in {f.name for f in dataclasses.fields(cls)}:
            default = dataclasses.replace(default, config_file=path)
    with _section_errors_raised():
        return tyro.cli(
            cls,
            default=default,
            args=argv,
            description=(
                description + " Settings also come from a YAML or JSON file, --config PATH, nested "
                "as the flags are (grpo: {eps_high: 0.3}); flags override it."
            ),
        )


def _section_errors_raised():
    """tyro reports a ValueError of a section's __post_init__ in a box of its own; this turns it
    back into the ValueError (one_line_errors prints it in one line). Uses tyro's parse-error
    hook where the installed tyro has it; elsewhere tyro's box stays."""
    import tyro

    hook = getattr(getattr(tyro, "_errors", None), "on_parse_error", None)
    if hook is None:
        return contextlib.nullcontext()

    def raise_value_error(event) -> None:
        if type(event).__name__ == "InstantiationFailure":
            raise ValueError(event.message)

    return hook(raise_value_error)


def read_config_file(path: str, cls: type[DataclassInstance], default: Any) -> Any:
    """`default` with a config file's settings applied, each checked against its type; errors
    name the file and the setting."""
    import yaml

    if not os.path.exists(path):
        fail(f"config file {path} does not exist")
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}  # YAML is a superset of JSON
    except yaml.YAMLError as exc:
        fail(f"{path} is not valid YAML/JSON: {str(exc).splitlines()[0]}")
    try:
        return config_from_dict(_merge(dataclasses.asdict(default), values, path), cls)
    except ValueError as exc:
        fail(f"{path}: {exc}")


def _merge(base: dict, override: Any, path: str) -> dict:
    """`base` with the nested mapping `override` laid over it (the file may give a section in
    part)."""
    if not isinstance(override, dict):
        fail(f"{path} must map setting names to values")
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = _merge(base[key], value, path)
        else:
            merged[key] = value
    return merged


@contextlib.contextmanager
def one_line_errors(debug: bool = False):
    """Turn a bad input (ValueError, FileNotFoundError, NotImplementedError raised inside) into
    one line on stderr and exit code 2; with `debug`, the exception propagates."""
    try:
        yield
    except (ValueError, FileNotFoundError, NotImplementedError) as exc:
        if debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        fail(f"{first} (--debug shows where)")


EXIT_DIVERGED = 3
"""The exit code of a run stopped by non-finite updates (agents.training.loop.NonFiniteUpdates)."""
EXIT_DISK_FULL = 4
"""The exit code of a run stopped by a full disk or quota (it resumes once there is space)."""
EXIT_ROLLOUTS_DOWN = 5
"""The exit code of a run stopped by rollout servers that failed and did not come back
(agents.training.loop.RolloutsDown; it resumes once they answer)."""


@contextlib.contextmanager
def one_line_faults(debug: bool = False):
    """A run stopped by a fault ends in one line on stderr with what to do: non-finite updates
    (EXIT_DIVERGED), a full disk (EXIT_DISK_FULL), rollout servers down (EXIT_ROLLOUTS_DOWN), a
    stop signal or Ctrl-C before the first step
    (128 + the signal). With `debug`, the exception propagates."""
    import signal

    from agents.training.loop import NonFiniteUpdates, RolloutsDown
    from agents.training.run import StepAbandoned
    from learners.checkpoint import CheckpointDiskFull, is_disk_full

    try:
        yield
    except (StepAbandoned, KeyboardInterrupt) as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        print(
            f"stopped by {signal.Signals(signum).name} before the first step: nothing to save",
            file=sys.stderr,
        )
        raise SystemExit(128 + signum) from None
    except (NonFiniteUpdates, RolloutsDown, CheckpointDiskFull, OSError) as exc:
        if debug or (isinstance(exc, OSError) and not is_disk_full(exc)):
            raise
        if isinstance(exc, (NonFiniteUpdates, RolloutsDown)):
            print(f"error: {exc}", file=sys.stderr)
            code = EXIT_DIVERGED if isinstance(exc, NonFiniteUpdates) else EXIT_ROLLOUTS_DOWN
            raise SystemExit(code) from None
        if isinstance(exc, OSError):
            where = f" writing {exc.filename}" if exc.filename else ""
            exc = f"no space left on the disk{where}: free space, then continue with --resume"
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_DISK_FULL) from None


def exit_cleanly_when_offline(run: Callable[[], Any], hint: str) -> Any:
    """Run `run()`; a hub that cannot be reached ends the program in one line naming `hint`
    (the program's own offline form) instead of the library's generic one."""
    from envs.problems import HubUnavailableError as DataOffline
    from learners.params import HubUnavailableError as ModelOffline

    try:
        return run()
    except (DataOffline, ModelOffline) as exc:
        print(f"error: {exc.reason}; {hint}", file=sys.stderr)
        raise SystemExit(2) from None
