"""``python -m supraopt.cli``: the same as the ``supraopt`` command."""

from supraopt.cli import main

main()
