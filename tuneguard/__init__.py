"""tuneguard: parameter-efficient fine-tuning on quantized backbones, with honest before/after evaluation."""

__version__ = "0.1.0"
