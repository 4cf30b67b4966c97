"""Training the group head (`model/head/group_head.py`) on SQuAD; run as `python -m train`.

Kept out of `model/`, which the server imports, so serving never loads training code; training
imports the engine's pieces from `model/` and the bench's selection and scoring from `bench/`.
"""
