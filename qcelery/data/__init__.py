"""Built-in data: a seeded synthetic market with Alpha158-style features, no download.

``DatasetH`` (Qlib's name) cuts a handler's panel into ``train`` / ``valid`` / ``test``
segments; ``SyntheticAlphaHandler`` builds the panel; :mod:`qcelery.data.cache` keeps
built handlers in GridFS so every worker of a cluster builds each one once.
"""

from .cache import HandlerCache, handler_key, replace_task_handler_with_cache
from .dataset import DatasetH
from .synthetic import SyntheticAlphaHandler

__all__ = ["DatasetH", "SyntheticAlphaHandler", "HandlerCache", "handler_key", "replace_task_handler_with_cache"]
