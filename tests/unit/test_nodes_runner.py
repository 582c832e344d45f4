"""nodes.probe.run_command: stdout on success; None for a missing tool, a failure, or a timeout."""

from __future__ import annotations

import sys
import time

from nodes.probe import call, run_command


def test_output_of_a_successful_command():
    assert run_command([sys.executable, "-c", "print('hello')"]) == "hello\n"


def test_missing_tool_and_failing_command():
    assert run_command(["quorum-no-such-tool-here"]) is None
    assert run_command([sys.executable, "-c", "import sys; print('partial'); sys.exit(3)"]) is None
    assert run_command([]) is None


def test_timeout_kills_the_command_and_what_it_started():
    # the child starts a grandchild that inherits the output pipe: killing only the child would leave
    # communicate() waiting for the grandchild
    code = ("import subprocess, sys, time; "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)")
    start = time.perf_counter()
    assert run_command([sys.executable, "-c", code], timeout=0.5) is None
    assert time.perf_counter() - start < 10


def test_call_turns_runner_failures_into_none():
    def raising(argv):
        raise PermissionError(argv[0])

    assert call(raising, ["x"]) is None
    assert call(lambda argv: b"bytes\n", ["x"]) == "bytes\n"
    assert call(lambda argv: 7, ["x"]) is None
