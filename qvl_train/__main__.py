"""``python -m qvl_train`` / ``qvl-train``: train, or run one of the other commands on a trained adapter.

    qvl-train [options]            train (under torchrun for several GPUs)
    qvl-train predict [options]    generate answers with the base model + adapter (qvl_train.infer.predict)
    qvl-train score [options]      OK-VQA / COCO captions / instruction scores, base vs adapter (qvl_train.infer.score)
    qvl-train export [options]     merge the adapter into the base weights (qvl_train.infer.export)

Whole-run problems exit 2 in one line.
"""

from __future__ import annotations

import importlib
import os
import sys

from qvl_data.errors import QvlError
from qvl_data.options import suggest

#: command -> module with a ``run(argv) -> None`` that parses its own options
COMMANDS = {
    "predict": "qvl_train.infer.predict",
    "score": "qvl_train.infer.score",
    "export": "qvl_train.infer.export",
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in COMMANDS:
            importlib.import_module(COMMANDS[argv[0]]).run(argv[1:])
            return
        if argv and not argv[0].startswith("-"):  # training takes options only: this was meant as a command
            raise QvlError(
                f"no such command {argv[0]!r}{suggest(argv[0], COMMANDS)}; the commands are "
                f"{', '.join(COMMANDS)}, and qvl-train alone trains (see qvl-train --help)"
            )
        from qvl_train.config import parse_config

        config = parse_config(argv)
        from qvl_train.loop import train

        train(config)
    except QvlError as e:
        if int(os.environ.get("RANK", "0")) == 0:  # the checks are the same on every rank: say it once
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
