"""Set-up that every worker process of an embedded Ray runs before its first task or actor."""

import gc


def collect_garbage_less_often() -> None:
    """Raise the young generation's threshold from 700 to 10,000 allocations. A Train worker's
    imports (torch, transformers, the loop) allocate millions of long-lived objects, and the
    default threshold scans them again and again while they load."""
    gc.set_threshold(10_000, 20, 20)
