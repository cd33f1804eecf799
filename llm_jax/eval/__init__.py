"""Evaluation: held-out metrics, calibration, the frozen suite, reports and comparisons."""
