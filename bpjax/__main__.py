"""``python -m bpjax``: the same command line as the ``bpjax`` script."""

from bpjax.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
