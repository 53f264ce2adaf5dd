"""Metrics: pure functions of a run's raw artifacts (never of live processes).

This package's own exports are the streaming pieces for the destination's
post-copy trace: :class:`Histogram`, the ``info ramblock`` parser and the trace
analyser.  Other modules (``events``, ``summary``, ...) are
imported by their full names.
"""

from migrator.metrics.histogram import Bucket, Histogram
from migrator.metrics.ramblock import RamBlock, load_ramblocks, parse_info_ramblock, parse_size
from migrator.metrics.trace import (
    TraceAnalyzer,
    analyze_trace,
    iter_fault_batches,
    iter_resolved_faults,
)
from migrator.metrics.trace_results import BlockAnalysis, FaultBatch, ResolvedFault, TraceAnalysis

__all__ = [
    "BlockAnalysis",
    "Bucket",
    "FaultBatch",
    "Histogram",
    "RamBlock",
    "ResolvedFault",
    "TraceAnalysis",
    "TraceAnalyzer",
    "analyze_trace",
    "iter_fault_batches",
    "iter_resolved_faults",
    "load_ramblocks",
    "parse_info_ramblock",
    "parse_size",
]
