"""What both command lines (``resnet-serve``, ``resnet-export``) share: the app's shape,
``--version``, and failures as one line on stderr with exit status 1."""

# No `from __future__ import annotations`: typer evaluates the option's annotation, which
# refers to a local function.
from typing import Annotated

import typer

from service import __version__


def make_app(name: str, help_text: str) -> typer.Typer:
    app = typer.Typer(
        name=name,
        help=help_text,
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
    )

    def print_version(value: bool) -> None:
        if value:
            typer.echo(f"{name} {__version__}")
            raise typer.Exit()

    @app.callback(help=help_text)
    def root(
        version: Annotated[
            bool,
            typer.Option(
                "--version", callback=print_version, is_eager=True, help="Print the version."
            ),
        ] = False,
    ) -> None:
        pass

    return app


def fail(prog: str, message: str) -> typer.Exit:
    """Print ``PROG: error: MESSAGE`` on stderr; return the Exit(1) to raise."""
    typer.echo(f"{prog}: error: {message}", err=True)
    return typer.Exit(1)
