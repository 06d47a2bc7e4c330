"""The `stip` Typer app and its entry point, which turns a StipError into one red line and exit status 2.

The commands register on `app` from their modules (one per party), which stip/cli/__init__.py imports.
"""

from __future__ import annotations

import logging
import sys

import typer

from stip.errors import StipError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="STIP: private inference on a protected Transformer, for three parties.")


def main() -> None:
    """The console script (`stip`, `python -m stip.cli`): errors a user can fix print one line, not a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        app(standalone_mode=False)
    except StipError as e:
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors carry their own exit codes
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise
