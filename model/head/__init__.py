"""The group head (CSA and the LM-head adapter) and the checkpoints shipped for it."""
