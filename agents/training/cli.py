"""The command-line layer of the experiments: settings from defaults, a YAML/JSON file and flags
(tyro); the library's reports as lines on stdout (logging); what the library raises as one line
on stderr and an exit code. Only entry points use it: the library raises and logs.

    configure_logging()
    with one_line_errors(debug="--debug" in argv):   # bad settings: one line, exit code 2
        cfg = load_config(argv, Config, description=__doc__)
    with exit_codes(debug=cfg.debug, offline_hint=HINT):   # toolgrpo.agents.training.errors' codes
        train(cfg)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

from toolgrpo.agents.training.config import config_from_dict
from toolgrpo.agents.training.errors import (
    ConfigError,
    HubUnreachable,
    Interrupted,
    TrainingError,
    disk_full_as_error,
)
from toolgrpo.agents.training.signals import ignore_stop_signals

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


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
            raise ConfigError("--config needs a path to a YAML or JSON file")
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
            raise ConfigError(event.message)

    return hook(raise_value_error)


def read_config_file(
    path: str, cls: type[DataclassInstance], default: Any, only: tuple[str, ...] | None = None
) -> Any:
    """`default` with a config file's settings applied, each checked against its type; errors
    name the file and the setting. `only`: read these top-level sections of the file (it must
    have them) and ignore the rest."""
    import yaml

    if not os.path.exists(path):
        raise ConfigError(f"config file {path} does not exist")
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}  # YAML is a superset of JSON
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML/JSON: {str(exc).splitlines()[0]}") from None
    if only is not None and isinstance(values, dict):
        missing = [key for key in only if key not in values]
        if missing:
            raise ConfigError(f"{path} has no {', '.join(missing)} section")
        values = {key: values[key] for key in only}
    merged = _merge(dataclasses.asdict(default), values, path)
    try:
        return config_from_dict(merged, cls)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _merge(base: dict, override: Any, path: str) -> dict:
    """`base` with the nested mapping `override` laid over it (the file may give a section in
    part)."""
    if not isinstance(override, dict):
        raise ConfigError(f"{path} must map setting names to values")
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = _merge(base[key], value, path)
        else:
            merged[key] = value
    return merged


@contextlib.contextmanager
def one_line_errors(debug: bool = False):
    """Bad input as one line on stderr and exit code 2: a ValueError, FileNotFoundError or
    NotImplementedError raised inside (an InputError or ConfigError of the library, or a check
    of the entry point's own). With `debug`, the exception propagates (the traceback)."""
    try:
        yield
    except (ValueError, FileNotFoundError, NotImplementedError) as exc:
        if debug:
            raise
        print(f"error: {first_line(exc)} (--debug shows where)", file=sys.stderr)
        raise SystemExit(2) from None


@contextlib.contextmanager
def exit_codes(debug: bool = False, offline_hint: str = ""):
    """What `train` (or any library call inside) raises, as the entry point's one line and
    exit code (toolgrpo.agents.training.errors): bad input 2 (a hub that cannot be reached: with
    `offline_hint`, how to run with local files), non-finite updates 3, a full disk 4, rollout
    servers down 5, a stop signal 128 + the signal (its line on stdout: where the checkpoint
    is); Ctrl-C before the run could save anything 130. With `debug`, the exception propagates
    (the traceback)."""
    from toolgrpo.hub import HubUnavailableError

    try:
        with disk_full_as_error():
            yield
    except Interrupted as stop:
        ignore_stop_signals()  # the process ends: a late repeat must not end it before
        print(stop, flush=True)
        raise SystemExit(stop.exit_code) from None
    except KeyboardInterrupt:
        print("stopped by SIGINT before the first step: nothing to save", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    except (HubUnreachable, HubUnavailableError) as exc:
        if debug:
            raise
        print(
            f"error: {exc.reason}; {offline_hint}" if offline_hint else f"error: {exc}",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    except TrainingError as exc:
        if debug:
            raise
        message = first_line(exc) + (" (--debug shows where)" if exc.exit_code == 2 else "")
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    except (ValueError, FileNotFoundError, NotImplementedError) as exc:  # the entry's own checks
        if debug:
            raise
        print(f"error: {first_line(exc)} (--debug shows where)", file=sys.stderr)
        raise SystemExit(2) from None


def first_line(exc: BaseException) -> str:
    """The first line of `exc`'s message (its type's name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _Stream(logging.Handler):
    """A handler that writes to sys.stdout or sys.stderr as they are when a record comes (a
    test's capture, a redirected stream), not as they were when logging was configured."""

    def __init__(self, name: str, level: int, prefix: str = ""):
        super().__init__(level)
        self.stream_name, self.prefix = name, prefix

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = getattr(sys, self.stream_name)
            stream.write(f"{self.prefix}{self.format(record)}\n")
            stream.flush()
        except Exception:
            self.handleError(record)


LIBRARY_LOGGERS = ("toolgrpo.agents", "toolgrpo.envs", "toolgrpo.learners")
"""The loggers of this project's packages: what the library reports (logging.getLogger
(__name__) in each module)."""


def configure_logging(verbose: bool = False) -> None:
    """The entry points' logging: the library's reports (INFO) as plain lines on stdout, its
    warnings and errors on stderr prefixed "warning: "; with `verbose`, DEBUG too. Other
    libraries' loggers are left as they are. Calling it again replaces its handlers."""
    for name in LIBRARY_LOGGERS:
        log = logging.getLogger(name)
        for handler in [h for h in log.handlers if isinstance(h, _Stream)]:
            log.removeHandler(handler)
        out = _Stream("stdout", logging.DEBUG)
        out.addFilter(lambda record: record.levelno < logging.WARNING)
        log.addHandler(out)
        log.addHandler(_Stream("stderr", logging.WARNING, prefix="warning: "))
        log.setLevel(logging.DEBUG if verbose else logging.INFO)
        log.propagate = False
