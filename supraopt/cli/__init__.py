"""The ``supraopt`` command line: parse, call the Python API, print. Nothing clever lives here.

One module per group of verbs, all registering on the one typer ``app`` of :mod:`supraopt.cli._common`:
:mod:`~supraopt.cli.campaign` (init, suggest, record, status, export), :mod:`~supraopt.cli.targets`
(target add, recipe), :mod:`~supraopt.cli.loop` (run,
demo), :mod:`~supraopt.cli.rig` (rig serve), :mod:`~supraopt.cli.fit` (fit, plot) and
:mod:`~supraopt.cli.benchmark` and :mod:`~supraopt.cli.dashboard`. Heavy imports (torch, pandas, matplotlib) happen inside the verbs.

Every user error prints one line ``error: ...`` naming the bad value and exits with code 1.
"""

# ruff: noqa: I001 - the order of these imports is the order of the verbs in --help
from supraopt.cli import campaign, targets, loop, rig, fit, benchmark, dashboard  # noqa: F401 - each registers its verbs
from supraopt.cli._common import app, main

__all__ = ["app", "main"]
