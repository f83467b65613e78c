"""`uno-train` / `python -m uno_engine.train`: the command's entry point (see docs/cli.md).

Bad input (a missing model folder, a malformed --train_data line, a caption longer than the critic's context,
an unknown pipeline family, a missing --resume_from_checkpoint, ...) ends the command with exit status 2 and
ONE line naming the thing, without a traceback.
"""

from __future__ import annotations

import sys

from .args import UsageError, parse_args


def main(argv=None) -> int:
    """Run `uno-train` with `argv` (default: sys.argv[1:]); returns the exit status."""
    try:
        args = parse_args(argv)
        from .loop import Trainer

        Trainer.build(args).run()
    except UsageError as e:
        print(f"uno-train: error: {e}", file=sys.stderr)
        return 2
    return 0
