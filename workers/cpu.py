"""Entry point of the ``cpu`` pool: ``python -m workers.cpu``."""

from .pools import POOLS, start

if __name__ == "__main__":
    start(POOLS["cpu"])
