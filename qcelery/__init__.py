"""qcelery: Qlib's task model on a MongoDB task pool, run by Celery workers.

Modules follow the flow: ``gen`` (templates -> tasks) -> ``manage`` (the pool) ->
``producer`` (batches and chords) -> ``worker`` (execute, aggregate) -> ``beat``
(recover, sweep) -> ``collect`` (results); ``calendar``, ``serial``, ``exp``, ``pit``,
``embedded`` and ``settings`` around them.
"""

__version__ = "0.1.0"
