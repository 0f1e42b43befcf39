"""Set-up that every worker process of an embedded Ray runs before its first task or actor."""

import atexit
import gc
import logging
import os
import sys

# Processes whose native teardown is skipped at exit (see end_train_controller_at_exit).
TRAIN_CONTROLLER_TITLE = "ray::TrainController"


def set_up_worker() -> None:
    """The hook itself (``raytune_ft.train.ray_start.WORKER_SETUP_HOOK``)."""
    collect_garbage_less_often()
    atexit.register(end_train_controller_at_exit)


def collect_garbage_less_often() -> None:
    """Raise the collector's thresholds from Python's (700, 10, 10) to (10,000, 20, 20): a young
    collection every 10,000 allocations, the older generations half as often. A Train worker's
    imports (torch, transformers, the loop) allocate millions of long-lived objects, and the
    default thresholds scan them again and again while they load."""
    gc.set_threshold(10_000, 20, 20)


def end_train_controller_at_exit() -> None:
    """End a Train controller's process here, at interpreter exit, before Ray's own exit handler
    (registered earlier, so run later) and its native teardown. That teardown can deadlock:
    shutting down the core worker's event loop destroys a pending publish that posts back to the
    same loop and takes its mutex a second time (gdb: ``scheduler::shutdown`` ->
    ``Publisher::~Publisher`` -> ``post_immediate_completion``). The controller then sleeps for
    ever holding ~400 MB and outlives the Ray that started it (two in one soak's 20 runs, one in
    the next: docs/reliability.md). The controller owns the run's worker actors, so it is the
    process that publishes at exit. When the interpreter exits, its task loop has ended and it
    has told its raylet that it is leaving: only logging and the streams need flushing. Other
    processes exit as Ray has them."""
    import ray._raylet

    if not ray._raylet.getproctitle().startswith(TRAIN_CONTROLLER_TITLE):
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
