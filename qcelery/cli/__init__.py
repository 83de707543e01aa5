"""The ``qcelery`` command line: one module per command group.

``main`` builds the typer app and turns every :class:`~qcelery.errors.QceleryError` into
one ``error: ...`` line and exit code 2 (1 is kept for ``wait`` when tasks failed);
``servers`` (up/down), ``tasks`` (enqueue, status, wait, admin, collect), ``run``
(worker, beat, flower) and ``demo`` hold the commands; ``state`` finds the settings
and the run directory's live state; ``checks`` asks each server for an answer quickly.
"""
