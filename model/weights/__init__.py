"""Base models and their weights: loading (the embedded GGUF, HF ids and directories, the tiny
test model) and the weight formats, with the quantized-block matmul."""
