"""Where the commands' progress lines go: warnings and errors to stderr, everything else to stdout.

A script that parses the output (or pipes it into a file) keeps the results on stdout, and a user
watching a long run still sees the warnings when stdout is redirected.
"""

from __future__ import annotations

import sys

WARNING_PREFIXES = ("warning:", "error:")


def console(message: str) -> None:
    """The default `log` of cap's commands: print `message` to stderr if it warns, else to stdout."""
    stream = sys.stderr if message.lstrip().lower().startswith(WARNING_PREFIXES) else sys.stdout
    print(message, file=stream, flush=stream is sys.stderr)
