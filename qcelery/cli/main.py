"""``qcelery``: the command line (console script ``qcelery = qcelery.cli.main:app``).

Every command reads the same settings (see ``qcelery.settings``; after ``qcelery up``,
the run directory's ``qcelery.toml``). Errors a user can fix are printed as one line,
``error: ...``, on stderr with exit code 2; ``wait`` exits 1 when tasks failed.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import typer

from .. import __version__
from ..errors import QceleryError
from . import demo, qlib_data, run, servers, tasks
from .state import CliState, err

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def _one_line(exc: BaseException) -> str:
    """The error as one line (``ValidationError``s name the setting and its variable)."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        parts = []
        for e in exc.errors():
            key = ".".join(str(x) for x in e.get("loc", ()))
            parts.append(f"setting {key} (QCELERY_{key.upper()}): {e.get('msg')}")
        return "invalid settings: " + "; ".join(parts)
    text = str(exc).strip() or type(exc).__name__
    return text


class _App(typer.Typer):
    """The typer app, with qcelery's errors turned into one line and exit code 2."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from pydantic import ValidationError
        from yaml import YAMLError

        try:
            return super().__call__(*args, **kwargs)
        except (QceleryError, ValidationError) as exc:
            message = _one_line(exc)
        except YAMLError as exc:  # a workflow file the loader did not wrap
            message = f"malformed YAML: {' '.join(str(exc).split())}"
        except KeyboardInterrupt:
            err.print("interrupted")
            sys.exit(EXIT_INTERRUPTED)
        head, _, rest = message.partition("\n")
        err.print(f"error: {head}", markup=False, soft_wrap=True)
        if rest and logging.getLogger().isEnabledFor(logging.INFO):
            err.print(rest, markup=False, soft_wrap=True)
        sys.exit(EXIT_ERROR)


app = _App(
    name="qcelery",
    help=(
        "Qlib-compatible task pools on MongoDB, run by Celery workers.\n\n"
        "Quick start: `qcelery demo`. Or: `qcelery up`, `qcelery enqueue config/demo.yaml`, "
        "`qcelery wait`, `qcelery collect --batch ID`, `qcelery down`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"qcelery {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    run_dir: Path | None = typer.Option(
        None,
        "--run-dir",
        envvar="QCELERY_RUN_DIR",
        show_envvar=True,
        help="Run directory of `up` (servers' data, logs, state). Default: .qcelery",
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what happens (INFO) to stderr."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Settings: QCELERY_* variables, ./qcelery.toml (or QCELERY_CONFIG), and after
    `qcelery up` the run directory's qcelery.toml."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    ctx.obj = CliState(run_dir=run_dir, verbose=verbose)


for group in (servers, tasks, run, demo, qlib_data):
    app.add_typer(group.app)


if __name__ == "__main__":
    app()
