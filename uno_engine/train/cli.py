"""`uno-train` / `python -m uno_engine.train`: the command's entry point (see docs/cli.md).

Bad input (a missing model folder, a malformed --train_data line, a caption longer than the critic's context,
an unknown pipeline family, a missing --resume_from_checkpoint, ...) ends the command with exit status 2 and
ONE line naming the thing, without a traceback.
"""

from __future__ import annotations

import contextlib
import sys

from .args import UsageError, parse_args


def main(argv=None) -> int:
    """Run `uno-train` with `argv` (default: sys.argv[1:]); returns the exit status. Under a multi-process
    launcher, an unexpected error ends its process at once (`uno_engine.distributed.fail_fast`), so the
    launcher stops the other processes instead of leaving them waiting in a collective."""
    from uno_engine.distributed import fail_fast, launched_world_size

    several = launched_world_size() > 1
    with fail_fast() if several else contextlib.nullcontext():
        return _main(argv)


def _main(argv) -> int:
    try:
        args = parse_args(argv)
        from .loop import Trainer

        Trainer.build(args).run()
    except UsageError as e:
        print(f"uno-train: error: {e}", file=sys.stderr)
        return 2
    return 0
