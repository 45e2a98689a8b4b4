"""Calibration data: moved to the core data layer, dlopt.data (one module for every verb's data).

These names are kept so that `from dlopt.data import CalibrationData, load_calibration`
keeps working until its callers move to dlopt.data (a later issue removes them)."""

from __future__ import annotations

from dlopt.data import DEFAULT_SAMPLE_COUNT, CalibrationData, Feeds, InputSpec, graph_inputs, progress_bar
from dlopt.data import load_data as load_calibration

__all__ = ["CalibrationData", "DEFAULT_SAMPLE_COUNT", "Feeds", "InputSpec", "graph_inputs", "load_calibration",
           "progress_bar"]
