"""Helpers of the end-to-end tests that run the real console script on a simulated session
(imported by the tests; ``pythonpath = ["tests"]`` in pyproject.toml)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

SCRIPT = Path(sys.executable).parent / "cryofastar-stream"
ENV = {**os.environ, "OMP_NUM_THREADS": "2"}


def run_cli(*args: str, ok: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``cryofastar-stream *args`` to its end (output captured); with ``ok``, its exit status must be 0."""
    result = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=ENV, timeout=timeout,
                            check=False)
    if ok:
        assert result.returncode == 0, result.stderr
    return result


def simulate_stacks(out: Path, n: int, box: int, per_stack: int, seed: int) -> list[Path]:
    """``cryofastar-stream simulate`` into ``out`` (3 Å/px, SNR 1); the stacks in order."""
    result = subprocess.run([str(SCRIPT), "simulate", "--out", str(out), "--n", str(n), "--box", str(box), "--apix",
                             "3.0", "--snr", "1", "--per-stack", str(per_stack), "--seed", str(seed)],
                            capture_output=True, text=True, env=ENV, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    return sorted(out.glob("particles_*.mrcs"))


def place(stack: Path, directory: Path) -> Path:
    """Write a stack the way acquisition software should: a hidden name, then a rename into place."""
    target = directory / stack.name
    shutil.copy(stack, directory / f".{stack.name}.part")
    os.replace(directory / f".{stack.name}.part", target)
    return target


def launched_workers(parent: int) -> list[int]:
    """Pids of the worker processes torch's launcher spawned under ``parent`` (not multiprocessing's helpers), in
    the order it started them (local rank 0 first)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"spawn_main" in command:
            found.append(int(entry.name))
    return sorted(found)


class ScriptProcess:
    """``cryofastar-stream ARGS`` in a subprocess, its stdout lines collected by a thread.

    With ``merge_stderr`` stderr goes into the same lines; otherwise :meth:`stop` returns it.
    """

    def __init__(self, *args: str, merge_stderr: bool = False) -> None:
        self.process = subprocess.Popen([str(SCRIPT), *args], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
                                        text=True, env=ENV)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()

    def _collect(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match:
        """The first output line matching ``pattern``; fails if the process exits or time runs out first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                match = re.search(pattern, line)
                if match:
                    return match
            if self.process.poll() is not None:
                stderr = self.process.stderr.read() if self.process.stderr is not None else ""
                raise AssertionError(f"exited ({self.process.returncode}) before printing {pattern!r}:\n"
                                     f"{''.join(self.lines)}{stderr}")
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s; output:\n{''.join(self.lines)}")

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        """Send ``sig`` (if still running) and wait: exit status and stderr (empty when merged)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout=120)
        return code, self.process.stderr.read() if self.process.stderr is not None else ""

    def close(self) -> None:
        """Kill it if still running; close the pipes (idempotent)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self._reader.join(timeout=10)
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()
