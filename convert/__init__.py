"""Carry a PyTorch Stable Diffusion / Riffusion model to PaddlePaddle, tensor by tensor, with proof."""

__version__ = "0.1.0"
