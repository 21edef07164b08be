"""Triton Inference Server: start and stop one (server), talk to it (client), find and load a repository's models
(discovery), and check them against PyTorch (smoke, with its checks and reference)."""

LAUNCHER_NAMES = ("local", "docker", "url")  # packager.triton.server.LAUNCHERS
PROTOCOL_NAMES = ("http", "grpc")  # packager.triton.client.PROTOCOLS
