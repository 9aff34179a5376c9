"""Parallel runtime: device mesh, pipeline, expert parallelism, ZeRO-1 and DEP."""
