"""What every command-line tool shares: one-line errors with the documented exit codes, and argument parsing of
`--config FILE key.sub=value ...`."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from .errors import DeitLTError

__all__ = ['run_tool', 'config_parser']


def run_tool(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a tool's `main`; a `DeitLTError` (bad config, data, checkpoint, a stopped run) becomes one line on stderr
    and its exit code (README: exit codes). Anything else is a bug and keeps its traceback."""
    try:
        return main(argv)
    except DeitLTError as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        return e.exit_code


def config_parser(doc: str, example_config: str) -> argparse.ArgumentParser:
    """`--config FILE` plus dotted overrides, with the tool's docstring (line breaks kept) as the help text."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', help=f'YAML config (may name `base` files), e.g. {example_config}')
    parser.add_argument('overrides', nargs='*', help='dotted overrides, e.g. optim.lr=1e-3 runtime.output_dir=runs/x')
    return parser
