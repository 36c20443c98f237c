"""The ``alps`` command line: one Typer app (``base.py``), shared options (``options.py``) and one module per
command (``inputs``: models, data, ppl; ``plan``; ``prune``; ``evaluate``: eval, runs; ``sweep``; ``track``), each
registering on the app when imported here. Every command has ``--help``; a user error prints its field, value,
problem and fix and exits with status 2; a run whose required tracking failed after its work was saved exits
with status 3."""

from . import evaluate, inputs, plan, prune, sweep, track  # noqa: F401 (each registers its commands on the app)
from .base import app

__all__ = ["app"]
