"""The `parscale` command: thin typer wrappers over the library; all printing happens here.

- `options`: the consoles, the option types, and the small parsers and printers the commands share;
- `models`: the commands that make and measure models (init, export, compare, train, train-heads, eval);
- `runtime`: the commands that run exports (generate, bench, serve, inspect, web), which import the
  runtime inside the command, so that the CLI starts without torch installed.
"""

from __future__ import annotations

import os
import sys
import traceback

import typer
from rich.markup import escape

from parscale.cli import models, runtime
from parscale.cli.options import DEFAULT_MODEL, err
from parscale.errors import ParScaleError

__all__ = ["DEFAULT_MODEL", "app", "main"]

app = typer.Typer(
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Export ParScale language models to ONNX and run them on small devices.",
)
for name, command in [("init", models.init), ("export", models.export), ("compare", models.compare),
                      ("train", models.train), ("train-heads", models.train_heads), ("eval", models.evaluate),
                      ("generate", runtime.generate), ("bench", runtime.bench), ("serve", runtime.serve),
                      ("inspect", runtime.inspect), ("web", runtime.web)]:
    app.command(name)(command)


def main() -> None:
    """Console-script entry: every error becomes one line on stderr and exit code 1.

    A ParScaleError is a problem the user can fix and is printed as it is. Anything else is a
    failure inside the library: one line with its type (and stage, for exports), the traceback
    only with --verbose.
    """
    verbose = any(a in ("--verbose", "-v") for a in sys.argv[1:])
    if sys.stdout is None:  # started with stdout closed (`>&-`): Python leaves sys.stdout None
        err.print("[bold red]error:[/] standard output is closed: redirect it instead (> FILE, or > /dev/null)")
        sys.exit(1)
    try:
        app()
    except BrokenPipeError:  # the reader left (`| head`): stop quietly, as coreutils do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        sys.exit(1)
    except KeyboardInterrupt as e:
        from parscale.locking import Terminated

        err.print("terminated" if isinstance(e, Terminated) else "interrupted")
        sys.exit(143 if isinstance(e, Terminated) else 130)
    except ParScaleError as e:
        cause = e.__cause__
        if verbose and cause is not None:
            err.print("".join(traceback.format_exception(cause)), markup=False, end="")
        hint = "; run with --verbose for the traceback" if cause is not None and not verbose else ""
        err.print(f"[bold red]error:[/] {escape(str(e))}{hint}")
        sys.exit(1)
    except Exception as e:
        if verbose:
            err.print(traceback.format_exc(), markup=False, end="")
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        hint = "" if verbose else "; run with --verbose for the traceback"
        err.print(f"[bold red]error:[/] {type(e).__name__}" + escape(f": {detail}" if detail else "") + hint)
        sys.exit(1)
