"""Every reach into Ray's private modules, in one place: when a Ray release moves them, this is
the one file to change. Each function says what it needs and why no public API gives it."""

from __future__ import annotations

import logging


def quiet_train_logs() -> None:
    """Train V2 logs every report at INFO through a logger named by its file path (no public
    knob), and Ray Data prints a hint to turn on the progress bars we keep off on purpose."""
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    try:
        from ray.train.v2._internal.execution import context

        context.logger.setLevel(logging.WARNING)
    except (ImportError, AttributeError):
        pass


def reports_taken() -> bool:
    """Whether the Train controller has taken every report this worker made (the fault tests
    wait for it, so a restart picks up from a known checkpoint); Train has no public query."""
    from ray.train.v2._internal.execution.context import get_train_context

    context = get_train_context()
    return context.current_report_index == context.report_call_index and context.get_result_queue().empty()


def run_snapshot_filename() -> str:
    """The name of Ray Train's run snapshot in a run's storage folder (it names the latest
    checkpoint); read before a resume to verify that checkpoint."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    return CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
