"""The one training loop (``loop``) and the driver that runs it on Ray Train: planning, datasets,
Ray start-up, the run itself (``runner``) and its written outputs."""
