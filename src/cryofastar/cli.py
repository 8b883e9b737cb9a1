"""The ``cryofastar-stream`` command line (typer): the app assembled from :mod:`cryofastar.commands`.

Each subcommand lives in its own module, ``cryofastar.commands.<name>``, as a typer
function whose options are the fields of settings dataclasses (:mod:`cryofastar.options`).
This module registers them, adds the root options (``--verbose``, ``--version``) and
the ``--watch DIR`` alias, and runs the app in :func:`main`. Bad input ends with one
``error:`` line and exit status 2, never a traceback.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import Annotated


def _interrupted_while_loading(*_: object) -> None:
    raise SystemExit(130)  # Ctrl-C while torch and the commands load: a quiet exit, not a traceback from an import


# restored once the imports below are done (only the main thread may set handlers)
_LOADING = threading.current_thread() is threading.main_thread()
_SIGINT = signal.signal(signal.SIGINT, _interrupted_while_loading) if _LOADING else None

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
    watch,
)

if _LOADING:
    signal.signal(signal.SIGINT, _SIGINT)

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
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        code = 130
    sys.exit(code if isinstance(code, int) else 0)
