"""`python -m parscale.train OUT [--seed N] [--steps1 N] [--steps2 N] [--threads N]`: train the default model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from parscale.train.recipe import Recipe, train_default


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parscale.train", description=__doc__)
    parser.add_argument("out", type=Path, help="checkpoint folder to write (replaced)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps1", type=int, default=Recipe.steps1, help="stage-1 (P=1) steps")
    parser.add_argument("--steps2", type=int, default=Recipe.steps2, help="stage-2 (P streams) steps")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args(argv)
    report = train_default(args.out, seed=args.seed, steps1=args.steps1, steps2=args.steps2,
                           threads=args.threads, log=lambda msg: print(msg, flush=True))
    print(f"held-out loss: P=1 {report.held_out_loss_p1:.4f}, "
          f"P={report.recipe['P']} {report.held_out_loss_pn:.4f} ({report.held_out_tokens} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
