"""The files of a group-head checkpoint directory, torch-free: the server checks a --csa path
before it imports torch."""

WEIGHTS_FILE = "csa.safetensors"
CONFIG_FILE = "config.json"  # the config's fields and, under "meta", the training metadata
