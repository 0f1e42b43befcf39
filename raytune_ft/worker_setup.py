"""Set-up that every worker process of an embedded Ray runs before its first task or actor: Ray
imports this module there (``raytune_ft.train.ray_start.WORKER_SETUP_MODULE``), and importing it
in a Ray worker process sets the process up (elsewhere it only names things)."""

import atexit
import gc
import importlib
import logging
import os
import sys

# Processes whose native teardown is skipped at exit (see end_train_controller_at_exit).
TRAIN_CONTROLLER_TITLE = "ray::TrainController"
# A warm driver's pool (raytune_ft.warm): the modules its processes import ahead of their actor,
# and a file that exists while the driver has Ray start them.
POOL_PRELOAD = "RAYTUNE_FT_POOL_PRELOAD"
POOL_FILLING = "RAYTUNE_FT_POOL_FILLING"


def set_up_worker() -> None:
    """What importing this module does in a worker process."""
    collect_garbage_less_often()
    atexit.register(end_train_controller_at_exit)
    preload_for_pool()


def collect_garbage_less_often() -> None:
    """Raise the collector's thresholds from Python's (700, 10, 10) to (10,000, 20, 20): a young
    collection every 10,000 allocations, the older generations half as often. A Train worker's
    imports (torch, transformers, the loop) allocate millions of long-lived objects, and the
    default thresholds scan them again and again while they load."""
    gc.set_threshold(10_000, 20, 20)


def preload_for_pool() -> None:
    """A process started for a warm driver's pool imports what a Train worker imports, before its
    actor arrives; any other (started during a run: Ray Data's tasks, actors beyond the pool)
    imports what its work needs, as without a warm driver."""
    filling = os.environ.get(POOL_FILLING)
    if filling and os.path.exists(filling):
        for module in filter(None, os.environ.get(POOL_PRELOAD, "").split(",")):
            importlib.import_module(module)


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


if os.path.basename(sys.argv[0]) == "default_worker.py":  # Ray's worker process: its entry point
    set_up_worker()
