"""Spectral estimators, metrics and the training-time monitor."""

from specopt.spectral.alarms import (
    Alarm,
    AlarmRule,
    ConditionNumberAlarm,
    LossDivergenceAlarm,
    LossSpikeAlarm,
    NonFiniteAlarm,
    Observation,
    SigmaMaxGrowthAlarm,
    StableRankCollapseAlarm,
    default_alarms,
)
from specopt.spectral.metrics import (
    METRIC_NAMES,
    geometric_mean,
    matrix_metrics,
    model_aggregates,
    singular_values,
    spectrum_metrics,
)
from specopt.spectral.monitor import MonitorHandle, SpectralMonitor
from specopt.spectral.power_iteration import (
    DEFAULT_EPS,
    init_singular_vectors,
    power_iteration_,
    sigma_max_estimate,
    vectors_are_valid,
)
from specopt.spectral.sinks import (
    ConsoleSink,
    LayerInfo,
    Sink,
    SinkGroup,
    Snapshot,
    SpectraFileSink,
    TensorBoardSink,
    parse_tag,
)

__all__ = [
    "DEFAULT_EPS",
    "METRIC_NAMES",
    "Alarm",
    "AlarmRule",
    "ConditionNumberAlarm",
    "ConsoleSink",
    "LayerInfo",
    "LossDivergenceAlarm",
    "LossSpikeAlarm",
    "MonitorHandle",
    "NonFiniteAlarm",
    "Observation",
    "SigmaMaxGrowthAlarm",
    "Sink",
    "SinkGroup",
    "Snapshot",
    "SpectraFileSink",
    "SpectralMonitor",
    "StableRankCollapseAlarm",
    "TensorBoardSink",
    "default_alarms",
    "geometric_mean",
    "init_singular_vectors",
    "matrix_metrics",
    "model_aggregates",
    "parse_tag",
    "power_iteration_",
    "sigma_max_estimate",
    "singular_values",
    "spectrum_metrics",
    "vectors_are_valid",
]
