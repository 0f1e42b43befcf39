"""Reports: plots (PNG) and tables of a run."""
