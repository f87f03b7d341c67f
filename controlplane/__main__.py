"""Lets `python -m controlplane` behave like the console script."""

from controlplane.cli import main

main()
