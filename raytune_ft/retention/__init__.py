"""Capability retention: measure what fine-tuning costs the original model, and keep it.

- ``references``: reference evaluations of the original capability, scored on the base model
  before training and again at every evaluation (``ref/<name>/<metric>``, ``retention/...``).
- ``regularizers``: L2-SP and EWC penalties towards the pretrained weights.
- ``wise_ft``: weight-space interpolation between the base and the tuned model after training.
Replay (reference rows mixed into training batches) lives in the loop, scored by a reference's
original probe.
"""
