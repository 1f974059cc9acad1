"""Metric implementations: each module is model-free and works on plain Python/numpy inputs."""
