"""deepship: a deployment and inference-optimization pipeline for trained deep-learning models.

Export to ONNX with a parity check, quantize (INT8, INT4, FP16, BF16), build engines, benchmark,
and report size, latency and accuracy per variant. See :mod:`deepship.api` for the Python API.
"""
__version__ = "0.1.0"

from .api import check, engine, export, load, publish, quantize, report  # noqa: E402,F401
from .errors import DeepshipError  # noqa: E402,F401
