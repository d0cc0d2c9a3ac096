"""The `balspec` command line: parse flags, call the library, hand results to the reporter.

Results go to stdout, progress and logs to stderr. A user's mistake prints one line and exits 1.
"""

from __future__ import annotations

import sys

import typer

from balspec.errors import BalspecError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Self-speculative decoding with Balcony exits: train, generate, bench, export.")


def main() -> None:
    try:
        app()
    except BalspecError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
