"""Folder names inside a release made by `python -m convert --release`, read by the runtime."""

EXPORT_FOLDER = "export"
SEED_FOLDER = "seed_images"
