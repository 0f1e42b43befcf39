"""The one training loop, its backends (ddp | deepspeed) and the driver that runs it on Ray Train."""
