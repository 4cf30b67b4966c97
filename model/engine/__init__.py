"""The step loop and its state: requests and their groups, the KV pool, the prefix cache,
sampling and text streams. `grouped_engine.GroupedEngine` is the one entry point."""
