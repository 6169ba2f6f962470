"""Models: the DiffDis dual-stream UNet, the single tower of ``method=oner`` and component builders."""

from .dual_stream_unet import DualStreamUNet
from .fusion import ImageCache
from .single_tower import SingleTowerConfig, SingleTowerModel

__all__ = ["DualStreamUNet", "ImageCache", "SingleTowerConfig", "SingleTowerModel"]
