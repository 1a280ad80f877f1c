"""`python -m tunelab ...` is the same as the `tunelab` console script."""

from tunelab.cli import entry

if __name__ == "__main__":
    raise SystemExit(entry())
