"""``python -m moe_train ...`` is the ``moe-train`` console script."""

import sys

from moe_train.train.control import install_early

install_early(sys.argv[1:])  # before importing torch: a stop signal is never lost

from moe_train.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
