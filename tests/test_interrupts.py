"""cryofastar.interrupts and the command line's Ctrl-C handling, in fresh Python processes.

A CI run once hung: pytest ran with SIGINT inherited as ignored, the command line put that
back after its imports, and a SIGINT sent while the session started was lost. And a
Ctrl-C raised inside an import or a compiled callback can be swallowed (typer's pydantic
core) or abort the process. These tests pin the fixes deterministically: which handler is
in place after the imports, and that an interrupt already received stops a command and
a session before they start.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from session_helpers import ENV


def _python(code: str, *, ignore_sigint: bool = False) -> subprocess.CompletedProcess:
    prefix = "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN)\n" if ignore_sigint else ""
    return subprocess.run([sys.executable, "-c", prefix + textwrap.dedent(code)], capture_output=True, text=True,
                          env=ENV, timeout=120)


def test_remember_and_received():
    done = _python("""
        from cryofastar import interrupts
        assert not interrupts.received()
        interrupts.remember(2, None)
        assert interrupts.received()
        print("ok")
    """)
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr


def test_after_loading_sigint_stops_even_when_inherited_as_ignored():
    """A background job or CI starts us with SIGINT ignored: the command line's handler replaces that for good."""
    for ignore in (False, True):
        done = _python("""
            import signal
            import cryofastar.cli as cli
            assert signal.getsignal(signal.SIGINT) is cli._interrupted, signal.getsignal(signal.SIGINT)
            print("ok")
        """, ignore_sigint=ignore)
        assert done.returncode == 0 and done.stdout == "ok\n", (ignore, done.stderr)


def test_a_host_programs_own_handler_is_left_in_place():
    done = _python("""
        import signal
        def mine(*_): pass
        signal.signal(signal.SIGINT, mine)
        import cryofastar.cli
        assert signal.getsignal(signal.SIGINT) is mine
        print("ok")
    """)
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr


def test_a_sigint_received_while_loading_ends_the_command_line_quietly(tmp_path):
    """As if its exception had been swallowed: the command does not start; status 130, no traceback."""
    done = _python(f"""
        import sys
        import cryofastar.cli as cli
        from cryofastar import interrupts
        interrupts.remember(2)
        sys.argv = ["cryofastar-stream", "watch", {str(tmp_path)!r}, "--zmq", "tcp://127.0.0.1:0",
                    "--metrics-port", "0"]
        cli.main()
    """)
    assert done.returncode == 130 and "Traceback" not in done.stderr, done.stderr
    assert "watching" not in done.stdout and not (tmp_path / "cryofastar").exists(), done.stdout


def test_run_service_does_not_start_a_session_after_a_received_interrupt(tmp_path):
    done = _python(f"""
        from pathlib import Path
        from cryofastar import interrupts
        from cryofastar.daemon.settings import DaemonSettings
        from cryofastar.services.watch import run_service
        interrupts.remember(15)
        daemon = run_service(DaemonSettings(watch=Path({str(tmp_path)!r}), zmq="tcp://127.0.0.1:0",
                                            metrics_port=None), echo=print)
    """)
    assert done.returncode == 0, done.stderr
    assert "watching" not in done.stdout, done.stdout  # printed only once the session started
    assert "stopped: 0 particles in the map" in done.stdout, done.stdout
