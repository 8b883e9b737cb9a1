"""Command-line options declared once, on the settings dataclasses they fill.

A settings dataclass marks each field that the command line sets with :func:`option`
or :func:`argument`; the default and the help text live there and nowhere else::

    @dataclass
    class SubscribeSettings:
        address: str = argument("tcp://127.0.0.1:5555", help="ZeroMQ endpoint of a running daemon.")
        save: Path | None = option(None, help="Write every received map here.")
        count: int | None = option(None, help="Exit after this many messages.")
        batch: int = 512  # not an option: no CLI metadata

:func:`settings_command` turns a function of settings objects into a typer command
whose parameters are those fields (it builds the function's ``__signature__`` and
``__annotations__``, which typer reads): the command line fills and constructs the
dataclasses (their ``__post_init__`` validates), then the function runs with them. A
``ValueError`` (or any other error type named) from either ends the command with one
``error: ...`` line on stderr and exit status 2, never a traceback.

Field options:

- ``flags``: typer's parameter declarations, e.g. ``("--publish-every",)``,
  ``("-o", "--output")`` or ``("--refine/--no-refine",)``; default ``--field-name``
  (a ``bool`` field then is a plain ``--field-name`` flag);
- ``cli_type`` and ``parse``: the type the command line reads and the function that
  turns its value into the field's (``metrics_port: int | None`` is read as ``int``,
  with ``parse=negative_is_none``);
- ``metavar``: the name an argument is shown under (``DIRECTORY``).

This module imports no other ``cryofastar`` module but the stdlib-only
:mod:`cryofastar.interrupts` (a command does not start after a Ctrl-C that arrived while the
command line loaded), so the settings dataclasses of every layer (recon, model, daemon,
monitoring) can declare their options with it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from cryofastar.interrupts import received as interrupted

__all__ = ["CLI_METADATA_KEY", "CliField", "argument", "cli_fields", "fail", "negative_is_none", "option",
           "settings_command"]

CLI_METADATA_KEY = "cli"
"""Key of a dataclass field's metadata that holds its :class:`CliField`."""


@dataclass(frozen=True)
class CliField:
    """How one dataclass field appears on the command line.

    Attributes
    ----------
    help: str
        Help text of the option or argument.
    flags: tuple[str, ...]
        typer parameter declarations; empty: ``--field-name``.
    is_argument: bool
        A positional argument instead of an option.
    metavar: str | None
        Displayed name of the value (arguments: shown in the usage line).
    cli_type: Any
        Type of the command-line value when it is not the field's type.
    parse: Callable[[Any], Any] | None
        Turns the command-line value into the field's value.
    """

    help: str
    flags: tuple[str, ...] = ()
    is_argument: bool = False
    metavar: str | None = None
    cli_type: Any = None
    parse: Callable[[Any], Any] | None = None


def option(default: Any = dataclasses.MISSING, *, help: str, flags: Sequence[str] = (),  # noqa: A002
           cli_type: Any = None, parse: Callable[[Any], Any] | None = None, metavar: str | None = None) -> Any:
    """A dataclass field that is a command-line option (no ``default``: a required option).

    Parameters
    ----------
    default: Any
        The field's default, also the option's.
    help: str
        Help text.
    flags: Sequence[str]
        typer parameter declarations (``"--x/--no-x"`` for a bool with both forms).
    cli_type: Any
        Type read on the command line when it differs from the field's.
    parse: Callable[[Any], Any] | None
        Command-line value -> field value.
    metavar: str | None
        Displayed name of the value.

    Returns
    -------
    dataclasses.Field
        The field, to assign in the dataclass body.
    """
    spec = CliField(help, tuple(flags), False, metavar, cli_type, parse)
    return dataclasses.field(default=default, metadata={CLI_METADATA_KEY: spec})


def argument(default: Any = dataclasses.MISSING, *, help: str, metavar: str | None = None,  # noqa: A002
             cli_type: Any = None, parse: Callable[[Any], Any] | None = None) -> Any:
    """A dataclass field that is a positional command-line argument (no ``default``: required).

    Parameters
    ----------
    default: Any
        The field's default, also the argument's.
    help: str
        Help text.
    metavar: str | None
        Name shown in the usage line (default: the field's name).
    cli_type: Any
        Type read on the command line when it differs from the field's.
    parse: Callable[[Any], Any] | None
        Command-line value -> field value.

    Returns
    -------
    dataclasses.Field
        The field, to assign in the dataclass body.
    """
    spec = CliField(help, (), True, metavar, cli_type, parse)
    return dataclasses.field(default=default, metadata={CLI_METADATA_KEY: spec})


def negative_is_none(value: int | None) -> int | None:
    """``-1`` (any negative number) on the command line means ``None`` (e.g. no metrics server)."""
    return None if value is None or value < 0 else value


def fail(message: str) -> typer.Exit:
    """Print ``error: message`` on stderr; return the exit (status 2) to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)


def cli_fields(cls: type) -> list[tuple[dataclasses.Field, CliField, Any]]:
    """The command-line fields of a settings dataclass: ``(field, spec, resolved field type)``, in order."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    return [(f, f.metadata[CLI_METADATA_KEY], hints[f.name]) for f in dataclasses.fields(cls)
            if CLI_METADATA_KEY in f.metadata]


def _parameter(f: dataclasses.Field, spec: CliField, field_type: Any) -> inspect.Parameter:
    cli_type = spec.cli_type if spec.cli_type is not None else field_type
    if spec.is_argument:
        info = typer.Argument(help=spec.help, metavar=spec.metavar)
    else:
        info = typer.Option(*spec.flags, help=spec.help, metavar=spec.metavar)
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        default = inspect.Parameter.empty
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[cli_type, info])


def settings_command(*classes: type, errors: tuple[type[BaseException], ...] = (ValueError, OSError)
                     ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: a typer command whose parameters are the CLI fields of ``classes``.

    The decorated function takes one instance of each class, in order, and returns
    nothing (it prints). The command builds the instances from the command line and
    calls it; ``errors`` raised by either become one ``error:`` line and exit status 2.

    Parameters
    ----------
    *classes: type
        Settings dataclasses; a field name may appear in only one of them.
    errors: tuple[type[BaseException], ...]
        Exception types reported as ``error: <message>`` with exit status 2.

    Returns
    -------
    Callable
        The decorator; the command it returns keeps the function's name and docstring.
    """
    groups: list[tuple[type, list[tuple[str, Callable[[Any], Any] | None]]]] = []
    parameters: list[inspect.Parameter] = []
    for cls in classes:
        names = []
        for f, spec, field_type in cli_fields(cls):
            if any(p.name == f.name for p in parameters):
                raise TypeError(f"field {f.name!r} of {cls.__name__} is already an option of this command")
            parameters.append(_parameter(f, spec, field_type))
            names.append((f.name, spec.parse))
        groups.append((cls, names))

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def command(**values: Any) -> None:
            if interrupted():  # Ctrl-C while the command line loaded, its exception swallowed
                raise SystemExit(130)
            try:
                instances = [cls(**{name: values[name] if parse is None else parse(values[name])
                                    for name, parse in names}) for cls, names in groups]
                func(*instances)
            except errors as exc:
                raise fail(str(exc)) from None

        # typer (0.29) reads inspect.signature(command, eval_str=True) and get_type_hints(command):
        # both come from these two attributes, and neither may follow __wrapped__ to func
        del command.__wrapped__
        command.__signature__ = inspect.Signature(parameters, return_annotation=None)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in parameters} | {"return": None}
        return command

    return decorate
