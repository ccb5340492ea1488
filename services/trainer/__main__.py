"""``python -m services.trainer``: claim and run pretrain/train jobs until stopped (SIGTERM)."""

from __future__ import annotations

import argparse
import logging

from services.trainer.runner import Trainer, install_signal_handlers


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.trainer", description=__doc__)
    p.add_argument("--poll-s", type=float, default=2.0, help="seconds between polls when no job is queued")
    p.add_argument("--max-jobs", type=int, default=None, help="exit after this many jobs (default: run forever)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    trainer = Trainer(poll_s=args.poll_s)
    install_signal_handlers(trainer)
    trainer.run_forever(max_jobs=args.max_jobs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
