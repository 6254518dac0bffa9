"""Static-graph (Paddle Inference) and ONNX export of a converted library's UNet, text encoder and VAE,
validated against the dynamic ppdiffusers models, and runtimes that stand in for those models.

    python -m export --model LIBRARY --out EXPORT [--components unet,...] [--onnx]
    from export.runtime import load_pipeline, load_unet
"""

from export.errors import ExportError
from export.specs import COMPONENTS, SPECS

__all__ = ["COMPONENTS", "SPECS", "ExportError", "export_library"]


def export_library(*args, **kwargs):
    """See export.exporter.export_library (imported on use: it pulls in Paddle)."""
    from export.exporter import export_library as run

    return run(*args, **kwargs)
