"""Set-up that every worker process of an embedded Ray runs before its first task or actor."""

import gc


def collect_garbage_less_often() -> None:
    """Raise the collector's thresholds from Python's (700, 10, 10) to (10,000, 20, 20): a young
    collection every 10,000 allocations, the older generations half as often. A Train worker's
    imports (torch, transformers, the loop) allocate millions of long-lived objects, and the
    default thresholds scan them again and again while they load."""
    gc.set_threshold(10_000, 20, 20)
