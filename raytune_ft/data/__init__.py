"""Data: offline assets, driver-side checks, and the Ray Data pipelines that feed the workers."""
