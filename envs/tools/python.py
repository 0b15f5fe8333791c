"""The `python` tool: code run in the sandbox, one persistent session per episode.

    tool = python_tool(timeout_s=10)      # the process's shared sandbox, or sandbox=...
    tool({"code": "x = 6 * 7"})           # ""  (the session opens on the first call)
    tool({"code": "x"})                   # "42" (variables persist, like notebook cells)
    tool.close()                          # the episode is over: its session ends

One tool holds one session at a time: give each environment its own tool and close it at the end
of every episode (the next call opens a fresh session). Code that raises, runs out of time or
memory, or crashes, is a ToolFailure whose message (the traceback, what output there was) is the
observation, so that it counts as a tool error; a sandbox whose server died raises SandboxError
(the session is gone; the next call starts afresh), which a Toolbox reports as an error too.
"""

from __future__ import annotations

import threading

from toolgrpo.envs.protocols import PYTHON_TOOL, truncate_middle
from toolgrpo.envs.sandbox import PythonSandbox, SandboxError, SandboxSession, shared_sandbox
from toolgrpo.envs.tools.tool import Tool, ToolArgumentError, ToolFailure


class _EpisodeSession:
    def __init__(self, sandbox: PythonSandbox | None, timeout_s: float, max_output_chars: int):
        self.sandbox, self.timeout_s, self.max_output_chars = sandbox, timeout_s, max_output_chars
        self.session: SandboxSession | None = None
        self.lock = threading.Lock()

    def run(self, code: str) -> str:
        if not code.strip():
            raise ToolArgumentError("the code is empty")
        with self.lock:
            try:
                if self.session is None:
                    self.session = (self.sandbox or shared_sandbox()).session()
                result = self.session.run(code, timeout_s=self.timeout_s)
            except SandboxError:
                self._close()
                raise
        text = (result.stdout + result.stderr).rstrip("\n")
        if not result.ok:  # the sandbox says why in stderr ("[sandbox] timed out after 1 s")
            raise ToolFailure(
                truncate_middle(text or f"[sandbox] {result.status}", self.max_output_chars)
            )
        return truncate_middle(text, self.max_output_chars)

    def _close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None

    def close(self) -> None:
        with self.lock:
            self._close()


def python_tool(
    sandbox: PythonSandbox | None = None, timeout_s: float = 10.0, max_output_chars: int = 2_000
) -> Tool:
    """The `python` tool over `sandbox` (default: the process's shared one): `timeout_s` per
    call, output longer than `max_output_chars` keeps its head and tail."""
    episode = _EpisodeSession(sandbox, timeout_s, max_output_chars)

    def python(code: str) -> str:
        """Run Python code.

        Args:
            code: The Python code to run.
        """
        return episode.run(code)

    return Tool.from_function(
        python, description=PYTHON_TOOL["function"]["description"], on_close=episode.close
    )
