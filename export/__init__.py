"""Export trained Deep-Z weights to ONNX (with a parity check) and build cached TensorRT engines.

Run as ``python -m export onnx ...`` or ``python -m export tensorrt ...``. This package file
imports nothing heavy: torch is imported by the ONNX exporter and tensorrt by the engine builder,
so the runtime can use the engine cache without pulling torch in.
"""
