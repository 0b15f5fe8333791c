"""The sandbox that the sandbox tests share: one PythonSandbox a test module, with a short
default timeout (test_sandbox_hostile.py overrides it with tighter limits)."""

import pytest
from sandboxes import FAST

from toolgrpo.envs.sandbox import PythonSandbox


@pytest.fixture(scope="module")
def sandbox():
    with PythonSandbox(FAST) as sb:
        yield sb
