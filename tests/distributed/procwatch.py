"""Run a command under a watchdog: a hang fails the test with every process's stack."""

from __future__ import annotations

import os
import re
import signal
import subprocess

import pytest

_FRAME = re.compile(r'^\s+File "(?P<path>[^"]+)", line (?P<line>\d+) in (?P<func>\S+)')


def where_stuck(out: str) -> str:
    """One line naming the innermost frame of each process's main thread in ``out`` (the
    stacks Python's faulthandler prints on SIGABRT), e.g.
    ``lockstep.py:44 any_rank | dataloader.py:1133 _try_get_data``."""
    found, take = [], False
    for line in out.splitlines():
        if line.startswith("Current thread"):
            take = True
        elif take and (m := _FRAME.match(line)):
            found.append(f"{os.path.basename(m['path'])}:{m['line']} {m['func']}")
            take = False
    return " | ".join(found) or "no stack printed"


def stacks_only(out: str, tail: int = 40) -> str:
    """The faulthandler stacks in ``out`` (thread headers and frames) and the last
    ``tail`` other lines, so the report fits in a CI log."""
    keep, other = [], []
    for line in out.splitlines():
        if line.startswith(("Thread 0x", "Current thread", "Fatal Python error")) or _FRAME.match(
            line
        ):
            keep.append(line)
        elif "Extension modules" not in line:
            other.append(line)
    return "\n".join(["--- output (tail) ---", *other[-tail:], "--- stacks ---", *keep])


def run_watched(cmd: list[str], cwd, timeout: int, env: dict | None = None) -> str:
    """Run ``cmd`` in its own process group; return its output (stdout and stderr) if it
    exits with 0. Past ``timeout`` seconds the whole group gets SIGABRT (with
    ``PYTHONFAULTHANDLER`` set, Python prints each thread's stack), then SIGKILL, and the
    test fails with where each process was stuck (in the failure's first line, which
    pytest's summary shows) and the stacks, instead of hanging the suite."""
    env = {**os.environ, "PYTHONFAULTHANDLER": "1", **(env or {})}
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    hung = False
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        hung = True
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
    if hung:  # outside the except block: one short report, not two chained tracebacks
        pytest.fail(
            f"hung for {timeout} s (watchdog), stuck at: {where_stuck(out)}\n"
            f"{' '.join(cmd)}\n{stacks_only(out)[-20000:]}",
            pytrace=False,
        )
    assert proc.returncode == 0, f"exit {proc.returncode}: {' '.join(cmd)}\n{out[-8000:]}"
    return out


def free_port() -> int:
    """A TCP port free on the loopback address now (for a rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
