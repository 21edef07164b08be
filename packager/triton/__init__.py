"""Run a Triton Inference Server for smoke tests: start, wait for readiness, load models, stop."""
