"""How a run's datasets reach its workers: the one DataConfig a Train run is given.

Kept apart from the training code on purpose: Ray Train's DatasetManager actor unpickles the
DataConfig, so this module's imports are that actor's imports (torch is not among them: it cost
the actor ~2 s of a core per run when this class lived beside the loop).
"""

from __future__ import annotations

from typing import Any

from ray.train import DataConfig


class ExactEvalDataConfig(DataConfig):
    """Train shards are equal (DDP needs the same number of steps everywhere); evaluation shards
    are not, so no evaluation row is dropped or repeated. A materialized set is split once for the
    whole run, here on the driver before the workers hold the CPUs (an equal split runs tasks, and
    after a lost machine no CPU may be left for them); only a streamed set needs a coordinator
    actor (a process each, ~2 s of a core to start on a small machine) and a new streaming
    execution every epoch."""

    def __init__(self, datasets: dict[str, Any], world_size: int):
        from ray.data.dataset import MaterializedDataset

        super().__init__()
        self.splits = {name: dataset.split(world_size, equal=name == "train")
                       for name, dataset in datasets.items() if isinstance(dataset, MaterializedDataset)}

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        for name, dataset in datasets.items():
            if name in self.splits:
                splits = [split.iterator() for split in self.splits[name]]
            else:
                dataset = dataset.copy(dataset)
                dataset.context.execution_options = self._resolve_execution_options(name)
                splits = dataset.streaming_split(world_size, equal=name == "train", locality_hints=worker_node_ids)
            for rank, split in enumerate(splits):
                output[rank][name] = split
        return output
