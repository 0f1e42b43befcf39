"""Every reach into Ray's private modules, in one place: when a Ray release moves them, this is
the one file to change. Each function says what it needs and why no public API gives it."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any, Callable


def quiet_train_logs() -> None:
    """Train V2 logs every report at INFO through a logger named by its file path (no public
    knob), and Ray Data prints a hint to turn on the progress bars we keep off on purpose."""
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    try:
        from ray.train.v2._internal.execution import context

        context.logger.setLevel(logging.WARNING)
    except (ImportError, AttributeError):
        pass


def reports_taken() -> bool:
    """Whether the Train controller has taken every report this worker made (the fault tests
    wait for it, so a restart picks up from a known checkpoint); Train has no public query. A loop
    run in process (``run_in_process``) hands each report over before ``report`` returns."""
    from ray.train.v2._internal.execution.context import get_train_context
    from ray.train.v2._internal.execution.train_fn_utils import LocalTrainFnUtils, get_train_fn_utils

    if isinstance(get_train_fn_utils(), LocalTrainFnUtils):
        return True
    context = get_train_context()
    return context.current_report_index == context.report_call_index and context.get_result_queue().empty()


def run_in_process(train_fn: Callable[[], Any], shards: dict[str, Any], on_report: Callable[[dict, Any, str | None], None]) -> None:
    """Run a Train loop function in this process as Ray Train's local mode does (``num_workers=0``:
    rank 0 of 1, ``get_dataset_shard`` gives ``shards``), each report going to ``on_report(metrics,
    checkpoint, checkpoint_dir_name)``. Local mode itself keeps only the last report, in memory, and
    ``TorchTrainer`` offers no way to persist its checkpoints or see its reports.

    In a Tune trial, ``ray.train``'s API refuses every call (it tells a trial by its session having
    no world rank): the session gets rank 0 while the loop runs, and none again while a report
    goes on (to ``tune.report``)."""
    from ray.train._internal.session import get_session
    from ray.train.v2._internal.execution.train_fn_utils import LocalTrainFnUtils, set_train_fn_utils

    trial = get_session()

    def ranked(rank: int | None) -> None:
        if trial is not None:
            trial.world_rank = rank

    class Reporting(LocalTrainFnUtils):
        def report(self, metrics, checkpoint=None, checkpoint_dir_name=None, **_):
            ranked(None)
            try:
                on_report(metrics, checkpoint, checkpoint_dir_name)
            finally:
                ranked(0)

    set_train_fn_utils(Reporting(experiment_name="in-process", dataset_shards=shards))
    ranked(0)
    try:
        train_fn()
    finally:
        ranked(None)
        set_train_fn_utils(None)


def run_snapshot_filename() -> str:
    """The name of Ray Train's run snapshot in a run's storage folder (it names the latest
    checkpoint); read before a resume to verify that checkpoint."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    return CHECKPOINT_MANAGER_SNAPSHOT_FILENAME


def local_accelerators() -> dict[str, float]:
    """The GPUs an embedded Ray would find on this machine, as the resources it would offer
    ({"GPU": n, "accelerator_type:<type>": 1}; {} without one), before Ray starts: Ray detects them
    in its private accelerator managers and says so only once it runs."""
    from ray._private.accelerators import get_accelerator_manager_for_resource

    manager = get_accelerator_manager_for_resource("GPU")
    count = manager.get_current_node_num_accelerators() if manager else 0
    visible = manager.get_current_process_visible_accelerator_ids() if manager else None
    count = min(count, len(visible)) if visible is not None else count
    if not count:
        return {}
    kind = manager.get_current_node_accelerator_type()
    return {"GPU": float(count), **({f"accelerator_type:{kind}": 1.0} if kind else {})}


def autoscaling() -> tuple[bool, dict[str, float] | None]:
    """Whether the connected cluster has an autoscaler, and the most of each resource it can grow
    to, where it says (None otherwise): Ray Train reads the same private state before its workers
    start; autoscaler v1 announces itself only by the status it writes to the GCS's key-value store."""
    from ray._private import ray_constants
    from ray._private.state import state
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        limits = state.get_max_resources_from_cluster_config()
        announced = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    except Exception:  # a Ray Client connection (ray://) reads no GCS state: it may grow (the wait is bounded)
        return True, None
    if limits:
        return True, {name: float(amount) for name, amount in limits.items()}
    return bool(announced), None


def ships_with_working_dir(path: Path, working_dir: Path, excludes: list[str]) -> bool:
    """Whether a job's working_dir upload holds ``path``: Ray walks the folder down, skipping what
    its default excludes, ``excludes`` and the .gitignore / .rayignore of every folder on the way
    match (the job client reads RAY_RUNTIME_ENV_IGNORE_GITIGNORE); no public API asks about one path."""
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import _get_excludes, get_excludes_from_ignore_files

    include_gitignore = os.environ.get(ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    skips = [_get_excludes(working_dir, ray_constants.get_runtime_env_default_excludes() + excludes)]
    parts = path.relative_to(working_dir).parts
    for depth in range(len(parts) + 1):
        step = working_dir.joinpath(*parts[:depth])
        if step.is_dir():
            skips += get_excludes_from_ignore_files(step, include_gitignore=include_gitignore, logger=logging.getLogger(__name__))
        if any(skip(step) for skip in skips):
            return False
    return True


def materialized(tables: list) -> Any:
    """A Ray MaterializedDataset of these Arrow tables, one block each, made in this process:
    ``ray.data.from_arrow`` computes every block's metadata in a Ray task, which in a job that has
    no Ray Data worker yet starts a process that imports Ray Data, for tables this process holds."""
    import ray
    from ray.data._internal.logical.interfaces import LogicalPlan
    from ray.data._internal.logical.operators import FromArrow
    from ray.data._internal.stats import DatasetStats
    from ray.data.block import BlockExecStats, BlockMetadataWithSchema
    from ray.data.context import DataContext
    from ray.data.dataset import MaterializedDataset

    metadata = [BlockMetadataWithSchema.from_block(table, block_exec_stats=BlockExecStats.builder().build()) for table in tables]
    context = DataContext.get_current().copy()
    plan = LogicalPlan(FromArrow([ray.put(table) for table in tables], metadata), context)
    return MaterializedDataset(plan, context, DatasetStats(metadata={"FromArrow": metadata}, parent=None))


def torch_worker_step(name: str, **kwargs: Any) -> Any:
    """On a Train worker: run one of Ray Train's private torch.distributed steps in
    ``ray.train.torch.config`` (``_set_torch_distributed_env_vars``, ``_setup_torch_process_group``,
    ``_shutdown_torch``). Their public way in, ``TorchConfig``, would import torch in the run's
    controller (see raytune_ft/train/torch_config.py)."""
    from ray.train.torch import config

    return getattr(config, name)(**kwargs)


def address_and_free_port() -> tuple[str, int]:
    """On a Train worker: its node's address and a free port, where rank 0 listens (Ray Train's
    own choice, private)."""
    from ray.train._internal.utils import get_address_and_port

    return get_address_and_port()


def torch_shutdown_timeout_s() -> int:
    """How long Ray Train waits for the workers' process group to shut down (its environment
    variable, read as Ray reads it)."""
    from ray._private.ray_constants import env_integer
    from ray.train.constants import DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S, TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S

    return env_integer(TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S, DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S)


def torch_framework() -> Any:
    """The framework Ray Train records for a torch run (its state export names it); private."""
    from ray.train.v2._internal.util import TrainingFramework

    return TrainingFramework.TORCH


def start_data_actors() -> None:
    """Create Ray Data's two cluster-wide actors (its stats and its autoscaling coordinator) from
    this process. Both are detached and pinned to the node of the first process that runs a Ray
    Data execution, for the life of the cluster; when the driver has prepared every split itself,
    that process is a Train worker, and an autoscaler never removes its node again (it never
    goes idle). Ray Data offers no public way to create them."""
    from ray.data._internal.cluster_autoscaler import get_or_create_autoscaling_coordinator
    from ray.data._internal.stats import get_or_create_stats_actor

    get_or_create_stats_actor()
    get_or_create_autoscaling_coordinator()


def ended_actors(since_ms: int) -> list[tuple[int, str]]:
    """(process id, runtime env serialized as Ray matches it to idle processes) of each actor of
    this job that started at or after ``since_ms`` (Unix time, ms) and has ended since. The public
    state API asks the dashboard, which may be off, and leaves the runtime env out."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    ended = state._connect_and_get_accessor().get_actor_table(ray.get_runtime_context().job_id, "DEAD")
    actors = (gcs_pb2.ActorTableData.FromString(raw) for raw in ended)
    return [(actor.pid, actor.serialized_runtime_env) for actor in actors if actor.start_time >= since_ms]


def local_raylet() -> Any:
    """A gRPC stub of this node's raylet (the channel helper adds the cluster's auth token)."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    node = next(node for node in ray.nodes() if node["NodeID"] == here)
    return raylet_stub(f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}")


@functools.lru_cache(maxsize=4)
def raylet_stub(address: str) -> Any:
    """One channel per raylet address, not one per call (the warm driver polls every 0.5 s)."""
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import node_manager_pb2_grpc

    return node_manager_pb2_grpc.NodeManagerServiceStub(init_grpc_channel(address))


def prestart_worker_processes(count: int, runtime_env: str, keep_alive_s: int) -> None:
    """Have this node's raylet start ``count`` idle worker processes for this job with the
    serialized ``runtime_env`` (it starts at most one per core at once and drops the rest), kept for
    at least ``keep_alive_s``: an actor created later with that runtime env starts in one of them
    instead of a new process. The raylet has the call (``PrestartWorkers``), Ray's Python API not."""
    import ray
    from ray.core.generated import common_pb2, node_manager_pb2, runtime_environment_pb2

    local_raylet().PrestartWorkers(node_manager_pb2.PrestartWorkersRequest(
        language=common_pb2.Language.PYTHON, job_id=bytes.fromhex(ray.get_runtime_context().get_job_id()), num_workers=count,
        runtime_env_info=runtime_environment_pb2.RuntimeEnvInfo(serialized_runtime_env=runtime_env), keep_alive_duration_secs=keep_alive_s),
        timeout=30)


def unused_worker_pids() -> set[int]:
    """The worker processes of this job on this node that have run nothing yet (no task, no actor):
    those an actor can still start in. From the raylet's stats of its workers."""
    import ray
    from ray.core.generated import common_pb2, node_manager_pb2

    job = bytes.fromhex(ray.get_runtime_context().get_job_id())
    stats = local_raylet().GetNodeStats(node_manager_pb2.GetNodeStatsRequest(include_memory_info=False), timeout=30).core_workers_stats
    return {worker.pid for worker in stats if worker.worker_type == common_pb2.WorkerType.WORKER and worker.job_id == job
            and worker.num_executed_tasks == 0 and not worker.actor_id.strip(b"\xff")}  # a nil actor id is all 0xff
