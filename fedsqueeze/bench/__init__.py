"""Benchmarks behind ``fedsqueeze bench``: each module exposes ``add_arguments`` and ``main``."""
