"""Comparable detectors from the literature, each satisfying anomalygpt.detector.Detector."""
