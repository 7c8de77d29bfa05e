"""Support overlap: per-token metric kernels (`metrics`) and the probe and command above
them (`probe`). See `metrics` for the definitions."""

from jdistill.overlap.metrics import (
  DEFAULT_THRESHOLDS,
  QUANTILES,
  RECOMMENDATIONS,
  AlarmTracker,
  aggregate,
  chunked_matched_overlap_metrics,
  chunked_overlap_metrics,
  matched_overlap_metrics,
  overlap_alarms,
  overlap_token_metrics,
  reading,
  span_log_ratio,
  thresholds_from_config,
)
from jdistill.overlap.probe import (
  OverlapProbe,
  coverage_ks,
  format_table,
  measure,
  plot,
  run,
)
