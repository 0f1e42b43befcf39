"""Ray for a run: connect to a cluster, or start an embedded local Ray sized for the run.

The embedded Ray is tuned for one machine (settings below, each with its reason and measurement);
a user's own settings and a real cluster's win. Ray Data's context is set for every run the same
way: no progress bars (our progress lines are the live view), rows in order, user errors raised
as themselves.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from typing import Any

from raytune_ft.errors import UserError
from raytune_ft.schema import Recipe
from raytune_ft.train.faults import FAULT_ENV
from raytune_ft.train.resources import Demand, check_cluster, check_machine, run_demand

logger = logging.getLogger(__name__)

# The niceness that Train workers take at their start, set by an embedded Ray for its processes.
WORKER_NICENESS = "RAYTUNE_FT_WORKER_NICENESS"
API_SERVER_ADDRESS = "RAY_API_SERVER_ADDRESS"
DATASOURCE_V2 = "RAY_DATA_USE_DATASOURCE_V2"
PRINT_PATCH = "RAY_TRAIN_ENABLE_PRINT_PATCH"  # off: a worker's print appears once, not again through Train's logger
EMBEDDED_RAY_DEFAULTS = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_idle_worker_killing_time_threshold_ms": "300000",
    "RAY_prestart_worker_first_driver": "0",
    PRINT_PATCH: "0",
}
# Imported by every worker process of an embedded Ray before its first task or actor.
WORKER_SETUP_MODULE = "raytune_ft.worker_setup"
PRELOAD_MODULES = "RAY_preload_python_modules"
QUIET_RAY = {"RAY_DATA_LOG_LEVEL": "WARNING"}


def init_ray(address: str | None, recipe: Recipe, need: Demand | None = None) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``), else start an embedded local Ray sized for the
    training workers the run needs at once (``need``; default ``scaling.workers``), checking
    first that they fit (``raytune_ft.train.resources``): this machine before an embedded Ray
    starts, the cluster (waiting for an autoscaler to grow it) once connected."""
    import ray
    from ray.data import DataContext

    need = need or run_demand(recipe)
    quiet_ray()
    if ray.is_initialized():
        check_cluster(need, "the Ray this process runs", recipe.scaling.max_wait_s)
    elif address or os.environ.get("RAY_ADDRESS"):
        address = address or os.environ["RAY_ADDRESS"]
        # Train hands this to its controller and workers as their runtime env's env_vars; an
        # embedded Ray's processes have it from their environment instead (start_local_ray).
        os.environ.setdefault(PRINT_PATCH, "0")
        logger.debug("connecting to Ray at %s", address)
        try:
            ray.init(address=address, logging_level="WARNING", log_to_driver=True)
        except ConnectionError as error:
            raise UserError("--address", f"cannot reach Ray at {address}: {str(error).splitlines()[0]}") from None
        check_cluster(need, f"the Ray cluster at {address}", recipe.scaling.max_wait_s)
    else:
        check_machine(need)
        # Ray Data's preprocessing needs CPU slots beside the training workers; logical CPUs
        # may exceed cores because tokenisation is light next to a training step.
        start_embedded_ray(max(os.cpu_count() or 1, math.ceil(need.bundle.get("CPU", 0) * need.workers) + 2))
    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.execution_options.preserve_order = True  # the same rows reach the same worker in the same order
    context.raise_original_map_exception = True  # a UserError in preprocess arrives as itself, not as UserCodeException
    # Ray Data's V2 parquet reader spends ~3 s listing and planning even a one-file read (measured
    # warm, 2 cores); the V1 reader takes 0.1 s. A run reads up to 3 splits plus 2 per reference.
    # RAY_DATA_USE_DATASOURCE_V2, when the user sets it, decides.
    if DATASOURCE_V2 not in os.environ:
        context.use_datasource_v2 = False


def quiet_ray() -> None:
    """Quiet by default: our own progress lines are the live view; Ray's INFO chatter is in its logs."""
    for key, value in QUIET_RAY.items():
        os.environ.setdefault(key, value)
    # Ray Data read RAY_DATA_LOG_LEVEL when it was imported, which may have been before this.
    logging.getLogger("ray.data").setLevel(os.environ["RAY_DATA_LOG_LEVEL"])


def start_embedded_ray(cpus: int) -> None:
    """The embedded Ray of a run (or of a warm driver, raytune_ft.warm) with ``cpus`` logical CPUs."""
    from ray.data import DataContext, ExecutionResources

    quiet_ray()
    logger.debug("starting an embedded Ray with %d logical CPUs", cpus)
    start_local_ray(num_cpus=cpus, logging_level="WARNING", log_to_driver=True)
    # Logical CPUs beyond the cores are for training beside Data, not for more Data tasks at once:
    # on more tasks than cores each new worker process imports the task's libraries for no
    # speed-up, and with Data's and Train's actors a run started 8 processes on 2 cores,
    # which Ray warns about (4x its start-up concurrency, the cores).
    limits = DataContext.get_current().execution_options
    if limits.is_resource_limits_default():
        limits.resource_limits = ExecutionResources.for_limits(cpu=os.cpu_count() or 1)


def start_local_ray(**kwargs: Any) -> None:
    """Start a new embedded Ray (never one that `ray start` left running here) whose own processes
    know its dashboard. Ray Train's placement-group cleaner finds the cluster through the state
    API; with another Ray on this host it finds two, gives up, and the placement group of every
    Train run whose controller dies with its Tune trial (an ASHA stop, a PBT exploit) leaks its
    CPUs until the next trial waits for ever. RAY_API_SERVER_ADDRESS, set while Ray starts, reaches
    every Ray process and names the one dashboard; this process's environment is left as it was."""
    import ray

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # This host is the whole cluster: no node of it can be preempted, so no Train run needs a
    # preemption-watcher actor (a process per run, seconds of a core to start). Train's controller
    # polls its workers every 2 s by default, which a run pays at its start and its end; polling
    # two local actors 4 times a second costs nothing. Ray ends an idle worker process after 1 s
    # once there are more than num_cpus; kept for 5 minutes, processes that already imported torch
    # and transformers can serve a later run in the same driver (4 tiny runs in one process: ~13 s
    # a warm run instead of ~22 s on 2 cores; one `raytune-ft run`, with a handful of workers under
    # num_cpus, gains nothing measurable). Ray starts num_cpus worker processes when the first
    # driver connects, with no runtime env; Train's actors, and the Data tasks they start, carry the
    # env_vars Train propagates, so only Ray Data's two actors could use them: the rest cost start-up
    # CPU and count towards Ray's warning about too many worker processes. A value the user set wins.
    # Ray runs the Python threads of every worker process at nice 15 (its services and C++
    # threads at 0), so the training workers share the cores as equals with Train's and Data's
    # helper actors. The training workers take the driver's niceness instead (where the OS lets
    # them, see train.loop.run_at_niceness); the helpers stay at 15. Measured against plain
    # torchrun: 0.66-0.70 -> 0.80-0.83 on cores short of CPU, no change on idle ones (benchmarks/MEASUREMENTS.md).
    # Every worker process imports WORKER_SETUP_MODULE before its first task or actor: fewer
    # garbage collections while a Train worker imports torch and transformers (a warm tiny
    # 2-worker run: 21.1 -> 19.5 CPU-s, alternated twice; benchmarks/MEASUREMENTS.md), and a
    # Train controller that cannot hang in Ray's native teardown at exit (raytune_ft.worker_setup).
    # Ray's preload list, not a runtime env's setup hook: with no runtime env, the idle processes
    # a warm driver has Ray start ahead of a run fit the run's actors (raytune_ft.warm).
    modules = [WORKER_SETUP_MODULE, *filter(None, os.environ.get(PRELOAD_MODULES, "").split(","))]
    ray_processes_env = {API_SERVER_ADDRESS: f"http://127.0.0.1:{port}", **{
        key: os.environ.get(key, default) for key, default in EMBEDDED_RAY_DEFAULTS.items()},
        WORKER_NICENESS: os.environ.get(WORKER_NICENESS, str(os.getpriority(os.PRIO_PROCESS, 0))),
        PRELOAD_MODULES: ",".join(modules)}
    # Every Ray process inherits this environment; an injected fault (tests) travels in a run's
    # config instead, or it would fire in every later run and Tune trial on this Ray.
    previous = {key: os.environ.get(key) for key in [*ray_processes_env, FAULT_ENV]}
    os.environ.update(ray_processes_env)
    os.environ.pop(FAULT_ENV, None)
    try:
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port, **kwargs)
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check_ray_address(address: str | None) -> None:
    """An explicit ``host:port`` must answer before anything is written: ray.init would otherwise
    retry for minutes, printing its own warnings."""
    address = address or os.environ.get("RAY_ADDRESS")
    host, _, port = (address or "").rpartition(":")
    if not host or "://" in address or not port.isdigit():
        return  # none (embedded Ray), "auto" or a ray:// client address: ray.init decides
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as error:
        raise UserError("--address", f"cannot reach Ray at {address} ({error.strerror or error})") from None
