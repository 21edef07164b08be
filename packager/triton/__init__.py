"""Triton Inference Server: start and stop one (server), and check a served repository (smoke)."""

LAUNCHER_NAMES = ("local", "docker", "url")  # packager.triton.server.LAUNCHERS
PROTOCOL_NAMES = ("http", "grpc")  # packager.triton.smoke.PROTOCOLS
