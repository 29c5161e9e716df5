"""`python -m safeprobe.reporting <sweep_dir> [...]`: report on any sweep folder(s).

For sweeps that were interrupted (the callback never ran) or run on several machines and
copied together: give every folder, and one merged report is written (to --out, default
the first folder). Prints summary.md; exit code 0 when written, 1 when no job was found.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from safeprobe.reporting.jobs import unreadable_sweep_dirs
from safeprobe.reporting.report import write_report
from safeprobe.reporting.wandb_summary import WandbTarget, sweep_group


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m safeprobe.reporting", description=__doc__.split("\n")[0])
    p.add_argument("sweep_dirs", nargs="+", type=Path, help="multirun folder(s), e.g. multirun/2025-01-01/12-00-00-000000")
    p.add_argument("--out", type=Path, default=None, help="where to write the report (default: the first sweep folder)")
    p.add_argument("--reference", default=None,
                   help="label of the group (as in summary.md, e.g. 'data=synthetic_instruct, method=sft') that groups "
                        "without an SFT run of their own are compared with")
    p.add_argument("--no-wandb", action="store_true", help="skip the W&B summary run")
    p.add_argument("--project", default="safeprobe", help="W&B project (default: safeprobe)")
    p.add_argument("--entity", default=None, help="W&B entity")
    p.add_argument("--group", default=None,
                   help="W&B group (default: the first sweep folder's absolute path, as the jobs used)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if status := unreadable_sweep_dirs(args.sweep_dirs):
        return status
    target = None
    if not args.no_wandb:
        group = args.group or sweep_group(args.sweep_dirs[0].absolute())
        target = WandbTarget(group=group, project=args.project, entity=args.entity)
    try:
        _, written = write_report(args.sweep_dirs, args.out, target, args.reference)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((args.out or args.sweep_dirs[0]).joinpath("summary.md").read_text(), flush=True)
    print("written: " + ", ".join(map(str, written)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
