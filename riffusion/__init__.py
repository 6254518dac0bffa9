"""Riffusion on Paddle: spectrogram images <-> audio, and (later) the text-to-spectrogram runtime.

Nothing here imports torch, diffusers or transformers.
"""
