"""``python -m qvl_train`` / ``qvl-train``: parse the options, train; whole-run problems exit 2 in one line."""

from __future__ import annotations

import os
import sys

from qvl_data.errors import QvlError


def main(argv: list[str] | None = None) -> None:
    from qvl_train.config import parse_config

    try:
        config = parse_config(argv)
        from qvl_train.loop import train

        train(config)
    except QvlError as e:
        if int(os.environ.get("RANK", "0")) == 0:  # the checks are the same on every rank: say it once
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
