"""Inference engine: shared pre/post-processing, ONNX export, TensorRT build, Segmenter backends."""
