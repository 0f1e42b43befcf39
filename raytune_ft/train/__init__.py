"""The one training loop, its backends (ddp | deepspeed) and the driver that runs it on Ray Train."""

from raytune_ft.train import deepspeed_backend  # noqa: F401  registers "deepspeed"; deepspeed itself is imported on use

# The niceness that Train workers take at their start, set by an embedded Ray for its processes.
WORKER_NICENESS = "RAYTUNE_FT_WORKER_NICENESS"
