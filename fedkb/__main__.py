"""Allow `python -m fedkb ...`."""

from fedkb.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
