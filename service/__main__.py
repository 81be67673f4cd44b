"""``python -m service`` / ``vabus-aggregator``."""

from __future__ import annotations

import sys

from service.cli import main as _main

__all__ = ["main"]


def main() -> None:
    sys.exit(_main(sys.argv[1:]))


if __name__ == "__main__":
    main()
