"""The watchdog every multi-process test runs under: a hang must fail fast and say where."""

from __future__ import annotations

import sys

import pytest
from procwatch import run_watched

STUCK = """
import time

def waiting_for_a_peer():
    time.sleep(600)

waiting_for_a_peer()
"""


def test_a_hang_fails_naming_the_frame_it_is_stuck_in(tmp_path):
    with pytest.raises(pytest.fail.Exception) as failure:
        run_watched([sys.executable, "-c", STUCK], tmp_path, timeout=3)
    first_line = str(failure.value).splitlines()[0]
    assert first_line.startswith("hung for 3 s (watchdog)")
    assert "waiting_for_a_peer" in first_line  # the innermost frame of the main thread
    assert "--- stacks ---" in str(failure.value)


def test_a_command_that_exits_returns_its_output(tmp_path):
    assert run_watched([sys.executable, "-c", "print('done')"], tmp_path, timeout=30) == "done\n"
    with pytest.raises(AssertionError, match="exit 3"):
        run_watched([sys.executable, "-c", "raise SystemExit(3)"], tmp_path, timeout=30)
