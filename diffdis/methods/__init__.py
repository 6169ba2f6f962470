"""Training methods behind one interface, picked by the config's top-level ``method`` key.

>>> import diffdis.methods as m
>>> m.available()
['clip', 'diffdis', 'disc_only', 'gen_only', 'oner', 'prior', 'rleg', 'unidiff']

Adding a method: one module here, one import line below, one config (docs/ADDING_A_METHOD.md).
"""

from .base import Method, available, get, register
from .clip import ClipMethod
from .diffdis import DiffDisMethod, sample_timesteps
from .disc_only import DiscOnlyMethod
from .gen_only import GenOnlyMethod
from .oner import OneRMethod
from .prior import PriorMethod
from .rleg import RlegMethod
from .unidiff import UniDiffMethod

__all__ = ["ClipMethod", "DiffDisMethod", "DiscOnlyMethod", "GenOnlyMethod", "Method", "OneRMethod", "PriorMethod",
           "RlegMethod", "UniDiffMethod", "available", "build", "get", "register", "sample_timesteps"]


def build(cfg, components) -> Method:
    """The method ``cfg.method`` built from ``components`` (see :meth:`Method.from_config`)."""
    return get(cfg.method).from_config(cfg, components)
