"""One engine step through the decoder: the lean forward over the KV pool, and the attention,
norm and rotary kernels behind it (C on a CPU, torch elsewhere)."""
