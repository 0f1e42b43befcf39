"""What a run asks Ray for, checked against what Ray has before any work is submitted.

The demand: so many training workers at once (``scaling.workers``; a tune experiment's
``workers_per_trial`` x ``max_concurrent_trials``), each reserving ``scaling.resources_per_worker``
and, with ``use_gpu``, a GPU, as Ray Train reserves them. The supply: for the embedded local Ray,
this machine, its CPU cores, GPUs and memory (the embedded Ray's logical CPUs are sized from the
demand, so they would always fit: the cores are what the workers really get); for a cluster, its
nodes now, and for an autoscaling cluster what it can grow to. A demand that can never fit is a
one-line error within seconds, where Ray would wait for ever. One that fits an autoscaling cluster
only once it grows asks the autoscaler for the nodes and waits, saying so and for how long, at most
``scaling.max_wait_s``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

from raytune_ft.errors import UserError
from raytune_ft.report.tables import plural
from raytune_ft.schema import Recipe

# Ray's own names for where a task runs: never asked for by a recipe, never listed as offered.
PLACEMENT_PREFIXES = ("node:", "bundle_group")
WAIT_REPORT_EVERY_S = 30.0


@dataclass
class Demand:
    """``workers`` workers at once, each reserving ``bundle``; ``fields``: the recipe field that
    asks for each resource; ``count_field`` and ``count``: the recipe's words for the count."""

    bundle: dict[str, float]
    fields: dict[str, str]
    workers: int
    count_field: str
    count: str

    def total(self, name: str) -> float:
        return self.bundle[name] * self.workers


@dataclass
class Supply:
    """What Ray has: ``total`` over the nodes and ``largest`` on one node (a worker runs on one);
    an autoscaling cluster ``grows``, up to ``limits`` where its autoscaler says."""

    name: str  # "this machine (...)", "the Ray cluster at ..."
    total: dict[str, float]
    largest: dict[str, float]
    nodes: int = 1
    grows: bool = False
    limits: dict[str, float] | None = None

    def offered(self) -> list[str]:
        return sorted(name for name in {*self.total, *(self.limits or {})} if not name.startswith(PLACEMENT_PREFIXES))

    def amount(self, value: float, name: str) -> str:
        if name == "memory":
            return f"{value / 2**30:.1f} GiB of memory"
        return f"{value:g} {name}" if value < 1e15 else f"unlimited {name}"


def demand(recipe: Recipe, workers: int, count_field: str, count: str) -> Demand:
    """``workers`` of the recipe's workers, each reserving what Ray Train's ScalingConfig reserves:
    ``resources_per_worker`` less its zero amounts, and a GPU with ``use_gpu``."""
    scaling = recipe.scaling
    bundle = {name: amount for name, amount in scaling.resources_per_worker.items() if amount}
    fields = {name: f"scaling.resources_per_worker.{name}" for name in bundle}
    if scaling.use_gpu and "GPU" not in bundle:
        bundle["GPU"], fields["GPU"] = 1.0, "scaling.use_gpu"
    return Demand(bundle, fields, workers, count_field, count)


def run_demand(recipe: Recipe) -> Demand:
    """The workers of ``raytune-ft run``."""
    return demand(recipe, recipe.scaling.workers, "scaling.workers", plural(recipe.scaling.workers, "worker"))


def experiment_demand(recipe: Recipe) -> Demand:
    """The workers of a tune experiment's trials that run at once."""
    tune = recipe.tune
    return demand(recipe, tune.max_concurrent_trials * tune.workers_per_trial, "tune.max_concurrent_trials",
                  f"{plural(tune.max_concurrent_trials, 'trial')} at once x {plural(tune.workers_per_trial, 'worker')}")


def machine_supply() -> Supply:
    """This machine: what an embedded Ray started here can give its workers."""
    import psutil

    from raytune_ft.ray_compat import local_accelerators

    total = {"CPU": float(os.cpu_count() or 1), "memory": float(psutil.virtual_memory().total), **local_accelerators()}
    return Supply("this machine (where the embedded Ray runs)", total, dict(total))


def cluster_supply(name: str) -> Supply:
    """The connected Ray's alive nodes, and whether (and how far) its autoscaler can grow it;
    ``name``: the cluster in words."""
    import ray

    from raytune_ft.ray_compat import autoscaling

    total: dict[str, float] = {}
    largest: dict[str, float] = {}
    alive = [node for node in ray.nodes() if node.get("Alive")]
    for node in alive:
        for resource, amount in node.get("Resources", {}).items():
            total[resource] = total.get(resource, 0.0) + amount
            largest[resource] = max(largest.get(resource, 0.0), amount)
    grows, limits = autoscaling()
    return Supply(name, total, largest, len(alive), grows, limits)


def impossible(need: Demand, supply: Supply) -> UserError | None:
    """Why the demand can never fit (None: it fits now, or may once an autoscaling cluster grows)."""
    for name, amount in need.bundle.items():
        where = need.fields[name]
        # The most of it the cluster can ever have; None: an autoscaler that does not say.
        most = supply.limits.get(name, 0.0) if supply.limits is not None else None if supply.grows else supply.total.get(name, 0.0)
        if most == 0.0 and not supply.total.get(name):
            if where == "scaling.use_gpu":
                return UserError(where, f"true, but {supply.name} has no GPU; set it to false, or run where there is one (--address)")
            return UserError(where, f"{supply.name} offers no resource {name!r}; it offers {', '.join(supply.offered()) or 'none'}")
        if not supply.grows and supply.nodes > 1 and amount > supply.largest.get(name, 0.0):
            return UserError(where, f"{supply.amount(amount, name)} per worker, but a worker runs on one node, and the largest "
                                    f"node of {supply.name} has {supply.amount(supply.largest.get(name, 0.0), name)}")
        if most is not None and need.total(name) > most:
            return UserError(need.count_field, f"{need.count} x {supply.amount(amount, name)} need {supply.amount(need.total(name), name)}, "
                                               f"but {supply.name} {'can grow to' if supply.grows else 'has'} {supply.amount(most, name)}; "
                                               "ask for fewer, or run on a larger cluster")
    return None


def shortfall(need: Demand, supply: Supply) -> str | None:
    """What the cluster lacks now for the demand, in words (None: nothing)."""
    missing = [f"{supply.amount(need.total(name), name)} (it has {supply.amount(supply.total.get(name, 0.0), name)})"
               for name in need.bundle if need.total(name) > supply.total.get(name, 0.0)]
    return ", ".join(missing) or None


def wait_for_growth(need: Demand, supply_now: Callable[[], Supply], request: Callable[[list[dict[str, float]]], None],
                    max_wait_s: float, poll_s: float = 5.0) -> None:
    """Ask the autoscaler (``request``: Ray's ``request_resources(bundles=...)``) for the demand,
    and wait until the cluster fits it, saying how long it has waited, at most ``max_wait_s``. The
    request is withdrawn either way: from then on the run's own tasks hold the nodes."""
    request([dict(need.bundle) for _ in range(need.workers)])
    started, reported = time.monotonic(), -math.inf
    try:
        while missing := shortfall(need, supply := supply_now()):
            waited = time.monotonic() - started
            if waited >= max_wait_s:
                raise UserError("scaling.max_wait_s", f"{supply.name} did not grow to {missing} in {waited:.0f} s; "
                                                      "raise scaling.max_wait_s, or ask for fewer workers")
            if waited - reported >= WAIT_REPORT_EVERY_S:
                print(f"[raytune-ft] waiting for the autoscaler to add nodes: need {missing}; waited {waited:.0f} s "
                      f"(gives up after scaling.max_wait_s = {max_wait_s:g} s)", flush=True)
                reported = waited
            time.sleep(min(poll_s, max_wait_s - waited))
    finally:
        request([])


def check_machine(need: Demand) -> None:
    """Before an embedded Ray starts: the demand fits this machine."""
    error = impossible(need, machine_supply())
    if error:
        raise error


def check_cluster(need: Demand, name: str, max_wait_s: float) -> None:
    """On a connected Ray (``name``: it in words): the demand fits it, or will once its autoscaler
    grows it (waiting for that)."""
    from ray.autoscaler.sdk import request_resources

    supply = cluster_supply(name)
    error = impossible(need, supply)
    if error:
        raise error
    if supply.grows and shortfall(need, supply):
        wait_for_growth(need, lambda: cluster_supply(name), lambda bundles: request_resources(bundles=bundles), max_wait_s)
