"""Turn a PyTorch / Hugging Face model into a tested NVIDIA Triton Inference Server model repository."""

__version__ = "0.1.0"
