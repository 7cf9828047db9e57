"""Simulated anomalies and conversations used to train the decoder and the assistant."""
