"""Inspection with an exported profile on onnxruntime or OpenVINO and numpy alone: nothing here imports torch.

`anomalygpt export --profile P --format onnx|openvino --out DIR` writes DIR; `RuntimeInspector.open(DIR)` reads it
and inspects images with the same score, threshold, verdict, map and regions as the torch Inspector with P
(scores within 1e-4; tests/test_export.py). `python -m anomalygpt.runtime DIR QUERY...` prints detect's JSON.
"""

from anomalygpt.runtime.bundle import RuntimeBundleError
from anomalygpt.runtime.inspector import RuntimeInspectionError, RuntimeInspector
from anomalygpt.verdict import Inspection  # what RuntimeInspector returns: the torch Inspector's own record

__all__ = ["Inspection", "RuntimeBundleError", "RuntimeInspectionError", "RuntimeInspector"]
