"""``python -m mlsae``: see `mlsae.cli`."""

from mlsae.cli import main

main()
