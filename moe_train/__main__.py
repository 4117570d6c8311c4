"""``python -m moe_train ...`` is the ``moe-train`` console script."""

from moe_train.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
