"""Print the ``verify`` report of a shard folder without failing on problems.

python -m data_tools.inspect SHARD_DIR [--grid out.png]
"""

from __future__ import annotations

from data_tools.verify import main as _verify_main


def main(argv: list[str] | None = None) -> int:
    """Same report as ``data_tools.verify``; exit 0 unless the arguments are bad."""
    return _verify_main(argv, fail=False)


if __name__ == "__main__":
    raise SystemExit(main())
