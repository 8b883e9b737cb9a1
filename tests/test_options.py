"""The option builder (cryofastar.options): typer commands whose options come from settings dataclasses.

Each test builds a real typer app from a small settings dataclass and runs it with
typer's CliRunner: defaults and help come from the dataclass, renamed and bool flags,
Optional and Path values, parsed values, fields that are not options, and the one-line
``error:`` exit 2 for a value the dataclass rejects.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cryofastar.options import argument, cli_fields, negative_is_none, option, settings_command


@dataclass
class ToySettings:
    """A settings dataclass of every kind of field the builder supports."""

    source: Path = argument(help="Where the toy reads from.", metavar="SOURCE")
    publish_seconds: float = option(10.0, help="Publish this often (s).", flags=("--publish-every",))
    refine: bool = option(True, help="Refine the toy.", flags=("--refine/--no-refine",))
    verbose_log: bool = option(False, help="Log a lot.")
    apix: float | None = option(None, help="Pixel size in Å.")
    port: int | None = option(9108, help="Port (-1: none).", cli_type=int, parse=negative_is_none)
    out: Path | None = option(None, help="Output directory.", flags=("-o", "--out"))
    queue_size: int = 4  # not an option

    def __post_init__(self) -> None:
        if not self.publish_seconds > 0:
            raise ValueError(f"--publish-every must be positive, got {self.publish_seconds}")


@dataclass
class ExtraSettings:
    """A second dataclass of the same command."""

    idle_exit: float | None = option(None, help="Exit after this many idle seconds.")


def _app(seen: list) -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.command()
    @settings_command(ToySettings, ExtraSettings)
    def toy(settings: ToySettings, extra: ExtraSettings) -> None:
        """Run the toy."""
        seen.append((settings, extra))
        if settings.out is not None and settings.out.name == "unwritable":
            raise OSError(f"{settings.out}: read-only")
        typer.echo(f"publish every {settings.publish_seconds}")

    @app.command()
    def other() -> None:  # a second command, so that typer keeps the subcommand name
        """Nothing."""

    return app


def test_defaults_come_from_the_dataclass_and_non_options_stay_unset(tmp_path: Path) -> None:
    seen: list = []
    result = CliRunner().invoke(_app(seen), ["toy", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.output == "publish every 10.0\n"
    settings, extra = seen[0]
    assert settings == ToySettings(source=tmp_path)
    assert settings.port == 9108 and settings.apix is None and settings.refine and not settings.verbose_log
    assert extra.idle_exit is None
    assert [f.name for f, _, _ in cli_fields(ToySettings)] == [
        "source", "publish_seconds", "refine", "verbose_log", "apix", "port", "out"]


def test_values_renamed_flags_bools_and_parsed_values(tmp_path: Path) -> None:
    seen: list = []
    args = ["toy", str(tmp_path), "--publish-every", "2.5", "--no-refine", "--verbose-log", "--apix", "1.5",
            "--port", "-1", "-o", str(tmp_path / "o"), "--idle-exit", "3"]
    result = CliRunner().invoke(_app(seen), args)
    assert result.exit_code == 0, result.output
    settings, extra = seen[0]
    assert settings.publish_seconds == 2.5 and not settings.refine and settings.verbose_log
    assert settings.apix == 1.5 and settings.port is None and settings.out == tmp_path / "o"
    assert isinstance(settings.source, Path) and isinstance(settings.out, Path)
    assert extra.idle_exit == 3.0
    assert "--queue-size" not in CliRunner().invoke(_app([]), ["toy", "--help"]).output


def test_help_and_defaults_shown_are_the_dataclass_ones() -> None:
    result = CliRunner().invoke(_app([]), ["toy", "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "Run the toy." in text and "SOURCE" in text
    for f in dataclasses.fields(ToySettings):
        if "cli" in f.metadata:
            assert f.metadata["cli"].help in text, f.name
    assert "--publish-every" in text and "[default: 10.0]" in text
    assert "--refine --no-refine" in text and "[default: refine]" in text
    assert "[default: 9108]" in text and "--out -o <path> Output directory." in text


def test_a_value_the_dataclass_rejects_is_one_error_line_with_status_2(tmp_path: Path) -> None:
    seen: list = []
    result = CliRunner().invoke(_app(seen), ["toy", str(tmp_path), "--publish-every", "0"])
    assert result.exit_code == 2 and not seen
    assert result.stderr == "error: --publish-every must be positive, got 0.0\n"
    assert result.stdout == ""


def test_an_error_of_the_command_body_is_one_error_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(_app([]), ["toy", str(tmp_path), "-o", str(tmp_path / "unwritable")])
    assert result.exit_code == 2
    assert result.stderr == f"error: {tmp_path / 'unwritable'}: read-only\n"


def test_a_field_may_be_an_option_of_only_one_class() -> None:
    @dataclass
    class Clash:
        apix: float = option(1.0, help="Again.")

    with pytest.raises(TypeError, match="apix"):
        settings_command(ToySettings, Clash)


def test_a_required_option_without_a_default_is_required(tmp_path: Path) -> None:
    @dataclass
    class Needs:
        output: Path = option(help="Output map.", flags=("-o", "--output"))

    seen: list = []
    app = typer.Typer(add_completion=False)

    @app.command()
    @settings_command(Needs)
    def needs(settings: Needs) -> None:
        """Need an output."""
        seen.append(settings)

    missing = CliRunner().invoke(app, [])
    assert missing.exit_code == 2 and "--output" in missing.output and not seen
    given = CliRunner().invoke(app, ["-o", str(tmp_path / "m.mrc")])
    assert given.exit_code == 0 and seen == [Needs(tmp_path / "m.mrc")]
