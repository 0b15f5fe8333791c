"""The run directory: one run's files, the checks that keep a run from writing over what it
must not (another run, its own inputs, a directory of something else), and what a resume must
find unchanged (the settings but RESUMABLE_CHANGES, the problems files).

    OUT/config.json         the settings (RUN_MARKER: what marks a directory as a run's)
    OUT/problem_files.json  the sha256 of the local problems files (PROBLEM_HASHES)
    OUT/summary.json        a finished run's summary
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

from toolgrpo.agents.training.config import RESUMABLE_CHANGES, Config, flatten
from toolgrpo.agents.training.errors import ConfigError


def config_changes(saved: dict, config: dict, allowed=RESUMABLE_CHANGES) -> list[str]:
    """'setting: old -> new' for every setting of `config` (nested as dataclasses.asdict gives
    it) whose saved value differs, but for the `allowed` settings and sections."""
    old, new = flatten(saved), flatten(json.loads(json.dumps(config, default=str)))
    changes = []
    for key, value in new.items():
        if key.split(".")[0] in allowed or key in allowed or key not in old:
            continue
        if old[key] != value:
            changes.append(f"{key}: {old[key]!r} -> {value!r}")
    return changes


RUN_MARKER = "config.json"
"""The file every run directory holds from its start (RunLog writes it): the settings of the
run, which mark a directory as one that --overwrite may replace."""


def is_run_directory(path: str) -> bool:
    """Whether `path` holds a run of this project: its RUN_MARKER, the settings of a run."""
    try:
        with open(os.path.join(path, RUN_MARKER)) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and {"out", "seed"} <= saved.keys()


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


def prepare_run_directory(
    out: str, config, resume: bool, overwrite: bool, inputs: tuple[str, ...] = ()
) -> None:
    """A run directory holds one run. A new run needs an empty (or missing) `out`, or
    `overwrite` of a run directory (is_run_directory) that neither holds one of the run's
    `inputs` (model, problems, config file) nor the current directory; `resume` needs the saved
    config to agree with `config` but for RESUMABLE_CHANGES. Otherwise a ConfigError (a ValueError) says why;
    nothing is deleted but a run. Makes `out`."""
    if not out.strip():
        raise ConfigError("--out is empty: name the run directory")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out} is a file, not a directory: choose another --out")
    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    present = sorted(os.listdir(out)) if os.path.isdir(out) else []
    shown = f"{', '.join(present[:4])}{', ...' if len(present) > 4 else ''}"
    if resume:
        saved_path = os.path.join(out, RUN_MARKER)
        if os.path.exists(saved_path):
            with open(saved_path) as f:
                saved = json.load(f)
            changes = config_changes(saved, cfg)
            if changes:
                raise ConfigError(
                    f"--resume with settings that differ from the run in {out}: "
                    f"{'; '.join(changes)} (resume with the saved settings, or start a new run "
                    f"with another --out)"
                )
        elif present:
            raise ConfigError(f"--resume: {out} holds no run ({shown}); choose its run directory")
    elif present and not is_run_directory(out):
        raise ConfigError(
            f"{out} is not empty and holds no run of this project ({shown}): choose another "
            "--out (--overwrite replaces only a run directory)"
        )
    elif present and not overwrite:
        raise ConfigError(
            f"{out} already holds a run ({shown}); continue it with --resume, replace it "
            f"with --overwrite, or choose another --out"
        )
    elif present:
        held = [p for p in inputs if p and os.path.exists(p) and _inside(p, out)]
        if _inside(os.getcwd(), out):
            held.insert(0, "the current directory")
        if held:
            raise ConfigError(
                f"--overwrite of {out} would delete {', '.join(held)}: choose another --out"
            )
        shutil.rmtree(out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot make the directory ({exc.strerror})") from None


def run_inputs(cfg: Config) -> tuple[str, ...]:
    """The local paths a run of `cfg` reads: the model directory, the problems files, the
    config file."""
    paths = (cfg.model.name, cfg.env.problems, cfg.env.eval_problems, cfg.config_file)
    return tuple(p for p in paths if p and os.path.exists(p))


def results_line(out: str) -> str:
    """Where a finished run's results are."""
    return (
        f"results in {out}: summary.json, metrics.jsonl, the plots, transcripts/, the adapter "
        f"in {os.path.join(out, 'adapter')} (experiments/evaluate.py --adapter scores it)"
    )


def finished_summary(cfg: Config) -> dict | None:
    """The summary of the run in cfg.out when it has trained its cfg.steps steps (a resume of
    it has nothing to do), else None."""
    path = os.path.join(cfg.out, "summary.json")
    try:
        with open(path) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    return summary if summary.get("step", 0) >= cfg.steps else None


PROBLEM_HASHES = "problem_files.json"
"""The sha256 of each local problems file of a run (beside its config.json): a resume on files
whose contents changed under the same path would train on other problems than it saved its
place in."""


def _problem_inputs(cfg: Config) -> list[tuple[str, str | None]]:
    """(setting, path) of every file a run's problems come from: the problems files, the
    ToolUse-v0 sources' and the search corpus."""
    inputs = [("problems", cfg.env.problems), ("eval_problems", cfg.env.eval_problems)]
    inputs.append(("corpus", cfg.env.corpus))
    for source in cfg.env.sources:
        inputs.append((f"sources.{source.name}.problems", source.problems))
        inputs.append((f"sources.{source.name}.eval_problems", source.eval_problems))
    return inputs


def _problem_hashes(cfg: Config) -> dict[str, str]:
    import hashlib

    hashes = {}
    for key, path in _problem_inputs(cfg):
        if path and os.path.isfile(path):
            with open(path, "rb") as f:
                hashes[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return hashes


def check_same_problems(cfg: Config) -> None:
    """A resume refuses problems files whose contents changed since record_problems (a
    ConfigError)."""
    path = os.path.join(cfg.out, PROBLEM_HASHES)
    if not (cfg.resume and os.path.exists(path)):
        return
    with open(path) as f:
        saved = json.load(f)
    hashes = _problem_hashes(cfg)
    changed = [key for key in hashes if key in saved and saved[key] != hashes[key]]
    if changed:
        paths = dict(_problem_inputs(cfg))
        names = ", ".join(f"--env.{k.replace('_', '-')} {paths[k]}" for k in changed)
        raise ConfigError(
            f"--resume: {names} changed since the run started (its problem order and place "
            "refer to the old contents): restore the file, or start a new run"
        )


def record_problems(cfg: Config) -> None:
    """OUT/PROBLEM_HASHES for a new run (a resume keeps the first one)."""
    path = os.path.join(cfg.out, PROBLEM_HASHES)
    if not (cfg.resume and os.path.exists(path)):
        with open(path, "w") as f:
            json.dump(_problem_hashes(cfg), f, indent=2)
