"""The ``cryofastar-stream`` command line (typer): the app assembled from :mod:`cryofastar.commands`.

Each subcommand lives in its own module, ``cryofastar.commands.<name>``, as a typer
function whose options are the fields of settings dataclasses (:mod:`cryofastar.options`).
This module registers them, adds the root options (``--verbose``, ``--version``) and
the ``--watch DIR`` alias, and runs the app in :func:`main`. Bad input ends with one
``error:`` line and exit status 2, never a traceback.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Annotated

from cryofastar import interrupts


def _interrupted(signum: int, _frame: object) -> None:
    interrupts.remember(signum)  # seen by options.settings_command and run_service even if the exception is swallowed
    raise KeyboardInterrupt  # as Python's default: "error: aborted", status 130


# While the modules below load (torch, scipy, gemmi: ~2 s), Ctrl-C is only remembered: an exception raised inside
# an import can leave numpy half-initialised (a RecursionError) or cross a C++ extension's callback (abort, status
# 134). The command line exits at once after the imports instead. Only the main thread may set handlers.
_LOADING = threading.current_thread() is threading.main_thread()
_PREVIOUS = signal.signal(signal.SIGINT, interrupts.remember) if _LOADING else None

import typer  # noqa: E402 - after the handler above, like every import below

try:  # typer >= 0.20 carries its own copy of click
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older typer on top of click
    from click.exceptions import NoArgsIsHelpError, UsageError

from cryofastar import __version__  # noqa: E402
from cryofastar.commands import (  # noqa: E402
    backproject,
    classify,
    dashboard,
    demo,
    evaluate,
    reconstruct,
    simulate,
    subscribe,
    train,
    train_vit,
    watch,
)

if _LOADING:
    if interrupts.received():
        raise SystemExit(130)  # a quiet exit, nothing started
    # from here Python's default, remembering; a handler the host program installed is left to it. SIGINT inherited
    # as ignored (a background job, `nohup`) is not restored: the session stops on it, as it always did once
    # running, and a window where it is ignored again would lose a SIGINT sent while the session starts
    _HOSTS = callable(_PREVIOUS) and _PREVIOUS not in (signal.default_int_handler, interrupts.remember)
    signal.signal(signal.SIGINT, _PREVIOUS if _HOSTS else _interrupted)
    _EXCEPTHOOK = sys.excepthook

    def _aborted(kind: type[BaseException], exc: BaseException, tb: object) -> None:
        """Ctrl-C between these imports and :func:`main` (the console script's own lines): one line, status 130."""
        if not issubclass(kind, KeyboardInterrupt):
            _EXCEPTHOOK(kind, exc, tb)  # type: ignore[arg-type]
            return
        print("error: aborted", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)  # nothing has started; Python would otherwise kill itself with SIGINT (status -2, not 130)

    sys.excepthook = _aborted

app = typer.Typer(
    name="cryofastar-stream",
    help="Live cryo-EM 3D reconstruction beside the microscope.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cryofastar-stream {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress (INFO).")] = False,
    version: Annotated[bool | None, typer.Option("--version", callback=_version, is_eager=True,
                                                 help="Print the version and exit.")] = None,
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


# the order of `cryofastar-stream --help`
app.command()(simulate.simulate)
app.command()(backproject.backproject)
app.command()(evaluate.evaluate)
app.command()(train.train)
app.command(name="train-vit")(train_vit.train_vit)


app.command()(reconstruct.reconstruct)
app.command()(classify.classify)
app.command()(watch.watch)
app.command()(subscribe.subscribe)
app.command()(dashboard.dashboard)
app.command()(demo.demo)


def _watch_alias(argv: list[str]) -> list[str]:
    """``--watch DIR ...`` / ``--watch=DIR ...`` anywhere before a subcommand -> ``watch DIR ...``."""
    for i, arg in enumerate(argv):
        if arg == "--watch" and i + 1 < len(argv):
            return [*argv[:i], "watch", argv[i + 1], *argv[i + 2 :]]
        if arg.startswith("--watch="):
            return [*argv[:i], "watch", arg.split("=", 1)[1], *argv[i + 1 :]]
        if not arg.startswith("-"):
            break
    return argv


def main() -> None:
    """Console-script entry point: usage errors too end in one ``error:`` line, status 2."""
    try:
        code = app(args=_watch_alias(sys.argv[1:]), standalone_mode=False)
    except NoArgsIsHelpError as exc:
        typer.echo(exc.ctx.get_help() if exc.ctx is not None else str(exc))
        code = 0
    except UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        typer.echo(f"error: {' '.join(exc.format_message().split())}{hint}", err=True)
        code = 2
    except (typer.Abort, KeyboardInterrupt):  # KeyboardInterrupt: Ctrl-C while typer builds the commands
        typer.echo("error: aborted", err=True)
        code = 130
    sys.exit(code if isinstance(code, int) else 0)
