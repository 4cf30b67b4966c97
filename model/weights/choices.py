"""The names of the weight formats (`formats.py`), torch-free: the server checks its flags
before it imports torch."""

WEIGHT_FORMATS = ("fp32", "bf16", "int4")  # fp32: the weights as loaded, in --dtype
AUTO_WEIGHTS = "auto"  # the fastest format that keeps answers: see loading.resolve_weights
WEIGHT_CHOICES = (AUTO_WEIGHTS, *WEIGHT_FORMATS)  # what --weights accepts
