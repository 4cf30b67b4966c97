"""The names of the weight formats (`formats.py`), torch-free: the server checks its flags
before it imports torch."""

WEIGHT_FORMATS = ("loaded", "bf16", "int4")  # loaded: the weights as loaded, in --dtype
WEIGHT_ALIASES = {"fp32": "loaded"}  # accepted too: on a CPU the weights load in float32
AUTO_WEIGHTS = "auto"  # the fastest format that keeps answers: see loading.resolve_weights
WEIGHT_CHOICES = (AUTO_WEIGHTS, *WEIGHT_FORMATS, *WEIGHT_ALIASES)  # what --weights accepts
