"""What every command-line tool shares: one-line errors with the documented exit codes, argument parsing of
`--config FILE key.sub=value ...`, and the body of the training tools."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from .errors import DeitLTError

__all__ = ['run_tool', 'config_parser', 'train_main']


def run_tool(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a tool's `main`; a `DeitLTError` (bad config, data, checkpoint, a stopped run) becomes one line on stderr
    and its exit code (README: exit codes). Anything else is a bug and keeps its traceback."""
    try:
        return main(argv)
    except DeitLTError as e:
        print(f'error: {" ".join(str(e).split())}', file=sys.stderr, flush=True)   # one line, whatever the message
        return e.exit_code


def config_parser(doc: str, example_config: str) -> argparse.ArgumentParser:
    """`--config FILE` plus dotted overrides, with the tool's docstring (line breaks kept) as the help text."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', help=f'YAML config (may name `base` files), e.g. {example_config}')
    parser.add_argument('overrides', nargs='*', help='dotted overrides, e.g. optim.lr=1e-3 runtime.output_dir=runs/x')
    return parser


def train_main(argv: list[str] | None, *, doc: str, example: str, config_cls: type, train: Callable,
               validate: Callable | None = None) -> int:
    """tools/train.py and tools/train_teacher.py: load the config, check it before any device or process group is
    set up, train under an accelerator, print the final test table."""
    from .config import load_config
    from .eval import format_report
    from .runtime import create_accelerator
    args = config_parser(doc, example).parse_args(argv)
    cfg = load_config(config_cls, args.config, args.overrides)
    if validate is not None:
        validate(cfg)
    accelerator = create_accelerator(cfg.runtime)
    try:
        result = train(cfg, accelerator)
    finally:
        accelerator.end_training()
    if accelerator.is_main_process and 'test' in result['last']:
        state = 'final' if result['finished'] else 'UNFINISHED'
        print(format_report(result['last']['test'], f'[{result["kind"]}] {cfg.name}: {state} after '
                                                    f'{result["progress"]["updates_done"]} updates, test split'))
        if 'best' in result:
            b = result['best']
            print(f'best {b["predictor"].upper()} top-1 on {b["split"]}: {b["top1"]:.2f} (epoch {b["epoch"] + 1}), '
                  f'best.safetensors')
        print(f'outputs in {cfg.runtime.output_dir}')
    return 0
