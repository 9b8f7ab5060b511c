"""Moved to execution.py (the one home of concurrency: processes, streams, fused groups, signals, devices); these
names stay importable from here."""

from lorastudy.execution import (  # noqa: F401
    DEFAULT_GPU_STREAMS,
    UnitResult,
    default_streams,
    run_threads,
    run_units,
    visible_gpus,
)
