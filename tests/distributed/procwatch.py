"""Run a command under a watchdog: a hang fails the test with every process's stack."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest


def run_watched(cmd: list[str], cwd, timeout: int, env: dict | None = None) -> str:
    """Run ``cmd`` in its own process group; return its output (stdout and stderr) if it
    exits with 0. Past ``timeout`` seconds the whole group gets SIGABRT (with
    ``PYTHONFAULTHANDLER`` set, Python prints each thread's stack), then SIGKILL, and the
    test fails with the output instead of hanging the suite."""
    env = {**os.environ, "PYTHONFAULTHANDLER": "1", **(env or {})}
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGABRT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            out = ""
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stacks = "\n".join(line for line in out.splitlines() if "Extension modules" not in line)
        pytest.fail(f"hung for {timeout} s (watchdog): {' '.join(cmd[:4])} ...\n{stacks[-20000:]}")
    assert proc.returncode == 0, f"exit {proc.returncode}: {' '.join(cmd)}\n{out[-8000:]}"
    return out
