"""Models: the DiffDis dual-stream UNet and component builders."""

from .dual_stream_unet import DualStreamUNet
from .fusion import ImageCache

__all__ = ["DualStreamUNet", "ImageCache"]
