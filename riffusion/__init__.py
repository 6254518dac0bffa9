"""Riffusion on Paddle: text to spectrogram image (pipeline), spectrogram image <-> audio (audio).

Nothing here imports torch, diffusers or transformers.
"""
