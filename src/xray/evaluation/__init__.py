"""Evaluation: metrics, calibration, shift validation, fold pooling, reports and figures (tensors in, numbers out)."""
