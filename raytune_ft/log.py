"""The package's messages: a logger per module (``logging.getLogger(__name__)``, all under
``raytune_ft``), shown as ``[raytune-ft] message`` by the one handler ``configure`` installs.

The command line calls ``configure`` with the level of ``-v`` / ``-q``. Ray workers are other
processes, where that call never happened: the driver hands its level on (``level()``) in the
Train run's ``train_loop_config``, and in a Tune experiment's shared trial config, and each worker
calls ``configure`` with it. A worker's handler writes to the worker's stdout and stderr, which
Ray forwards to the driver's, so the driver's ``-q`` silences the workers' progress lines as well
and ``-v`` shows their debug lines. A library user who never calls ``configure`` gets Python's
defaults: warnings only, unless their own logging set-up says more (the workers follow it).
"""

from __future__ import annotations

import logging
import sys

PACKAGE = "raytune_ft"
FORMAT = "[raytune-ft] %(message)s"


class ConsoleHandler(logging.StreamHandler):
    """Info and debug lines to stdout (the run's narrative, beside the results), warnings and
    errors to stderr. The stream is looked up for every message, so a replaced ``sys.stdout``
    (pytest's capture, a redirecting caller) receives what follows."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        super().emit(record)


def configure(level: int) -> None:
    """Show the package's messages from ``level`` up, once each. Our handler alone prints them:
    on a Train worker, Ray Train gives the root logger a console handler of its own, which would
    print them a second time without the prefix."""
    logger = logging.getLogger(PACKAGE)
    logger.setLevel(level)
    logger.propagate = False
    if not any(isinstance(handler, ConsoleHandler) for handler in logger.handlers):
        handler = ConsoleHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        logger.addHandler(handler)


def level() -> int:
    """The level the package's messages are shown from here: what workers are configured with."""
    return logging.getLogger(PACKAGE).getEffectiveLevel()
