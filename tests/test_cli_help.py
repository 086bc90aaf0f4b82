"""Every --help shows its texts whole: Rich markup must not eat '[loop]' and the like."""

from __future__ import annotations

import re

import pytest
import typer
from typer._click import Command  # typer ships its own click
from typer.testing import CliRunner

from supraopt.cli import app

runner = CliRunner()


def commands() -> list[tuple[list[str], Command]]:
    """(path of names, command) for every command and sub-command of the app."""
    root = typer.main.get_command(app)
    found: list[tuple[list[str], Command]] = []

    def walk(path: list[str], command: Command) -> None:
        found.append((path, command))
        for name, sub in getattr(command, "commands", {}).items():
            walk([*path, name], sub)

    walk([], root)
    return found


def normalised(text: str) -> str:
    """Help as one line: box-drawing characters and wrapping removed."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def unescaped(help_text: str) -> str:
    return normalised(help_text.replace("\\[", "["))


@pytest.mark.parametrize("path", [p for p, _ in commands()], ids=lambda p: " ".join(p) or "supraopt")
def test_help_shows_every_text_whole(path: list[str]) -> None:
    command = dict((tuple(p), c) for p, c in commands())[tuple(path)]
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "250"}, terminal_width=250)
    assert result.exit_code == 0, result.output
    shown = normalised(result.output)
    texts = [help_text for param in command.params if (help_text := getattr(param, "help", None))]
    if command.help:
        texts.append(command.help.split("\n\n")[0])
    assert texts, path
    for text in texts:
        assert unescaped(text) in shown, (text, shown)


def test_run_help_names_the_loop_table() -> None:
    result = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "250"}, terminal_width=250)
    assert "(default: [loop] budget)" in normalised(result.output)
    assert "(default: [loop] batch)" in normalised(result.output)
