"""Progress logging for this project's packages, in every process that runs its code."""

from __future__ import annotations

import logging
import sys


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (test runners swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


PACKAGES = ("fedgen", "strategies", "clients")


def setup(level: int = logging.INFO) -> None:
    """Give the project's loggers one stream handler (idempotent). They do not propagate,
    so Flower's own handler and ours never print the same line twice."""
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not logger.handlers:
            logger.addHandler(handler)
        logger.propagate = False
