"""Entry point of the ``gpu`` pool: ``python -m workers.gpu``."""

from .pools import POOLS, start

if __name__ == "__main__":
    start(POOLS["gpu"])
