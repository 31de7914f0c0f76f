"""Metrics: pure tensor functions and the streaming engine (``specs/metrics.md``).

Imports only torch, numpy and scipy; knows nothing of the rest of openworld. Every function returns
fractions (×100 happens at logging time) and NaN where a value is undefined.
"""

from .classification import (
    accuracy,
    balanced_accuracy,
    confusion_counts,
    flat_confusion_index,
    group_mean_accuracy,
    group_micro_accuracy,
    harmonic_mean,
    per_class_accuracy,
    target_rank,
    topk_accuracy,
)
from .continual import (
    acc_a_triangle,
    aia,
    aia_tasks,
    average_accuracy,
    average_session_accuracy,
    batch_mean_accuracy,
    bwt,
    cil_running_metrics,
    forgetting,
    fscil_run_metrics,
    fscil_session_metrics,
    fwt,
    performance_drop,
    pooled_accuracy,
    task_accuracies,
)
from .engine import ENGINES, History, MetricsEngine, create_engine, register_engine

__all__ = [
    "ENGINES",
    "History",
    "MetricsEngine",
    "create_engine",
    "register_engine",
    "acc_a_triangle",
    "accuracy",
    "aia",
    "aia_tasks",
    "average_accuracy",
    "average_session_accuracy",
    "balanced_accuracy",
    "batch_mean_accuracy",
    "bwt",
    "cil_running_metrics",
    "confusion_counts",
    "flat_confusion_index",
    "forgetting",
    "fscil_run_metrics",
    "fscil_session_metrics",
    "fwt",
    "group_mean_accuracy",
    "group_micro_accuracy",
    "harmonic_mean",
    "per_class_accuracy",
    "performance_drop",
    "pooled_accuracy",
    "target_rank",
    "task_accuracies",
    "topk_accuracy",
]
