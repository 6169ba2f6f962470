"""Loading pipelines whose folders name components of diffdis's own classes (``DualStreamUNet``, ``PatchAutoencoder``).

diffusers resolves a component library that is not diffusers/transformers only from ``sys.modules`` and then
needs ``ModelMixin`` in that module's namespace. :class:`CustomComponentsPipeline` loads such components itself,
with their own ``from_pretrained``, and hands them to diffusers. Modules of the ``diffdis`` package are imported;
others must already have been imported (importing a module named by a folder would run its code).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional, Union

from diffusers import DiffusionPipeline

TRUSTED_PACKAGE = "diffdis"  # an index may name modules of this package; they are imported on load


def _is_custom_library(library: Optional[str]) -> bool:
    """True for a component whose index library is neither diffusers nor transformers."""
    from diffusers import pipelines
    from diffusers.pipelines.pipeline_loading_utils import LOADABLE_CLASSES

    return library is not None and library not in LOADABLE_CLASSES and not hasattr(pipelines, library)


def _resolve_custom_class(library: str, class_name: str, index_name: str) -> type:
    """Find ``class_name`` in ``library``: a ``diffdis`` module (imported here) or one already imported."""
    trusted = library == TRUSTED_PACKAGE or library.startswith(TRUSTED_PACKAGE + ".")
    if trusted:
        try:
            module = importlib.import_module(library)
        except ImportError as err:
            raise ValueError(f"cannot import {library!r} named in {index_name}: {err}") from err
    elif library in sys.modules:
        module = sys.modules[library]
    else:
        raise ValueError(
            f"{index_name} names the module {library!r}, which is not part of {TRUSTED_PACKAGE} and has not been"
            f" imported; import {library} before loading (importing a module named by a folder would run its code)"
        )
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ValueError(f"module {library!r} has no class {class_name!r} (named in {index_name})")
    return cls


class CustomComponentsPipeline(DiffusionPipeline):
    """A ``DiffusionPipeline`` that loads components of diffdis classes from a local folder.

    Subclasses keep diffusers' contract; several pipelines can share one folder (and its component
    subfolders) by giving each its own index file through ``config_name``.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs: Any):
        """Load a saved pipeline folder, including components of custom classes (e.g. ``DualStreamUNet``).

        Keyword arguments are those of ``DiffusionPipeline.from_pretrained``.

        Raises:
            ValueError: the folder has no index file of this pipeline (``cls.config_name``).
        """
        folder = Path(pretrained_model_name_or_path)
        index_file = folder / cls.config_name
        if not index_file.is_file():
            raise ValueError(f"{folder} is not a diffdis model folder for {cls.__name__} (no {cls.config_name})")
        index = json.loads(index_file.read_text())
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        custom = {}
        for name, value in index.items():
            if name.startswith("_") or name in kwargs or not isinstance(value, list) or len(value) != 2:
                continue
            library, class_name = value
            if _is_custom_library(library):
                component_cls = _resolve_custom_class(library, class_name, cls.config_name)
                load_kwargs = {"dtype": dtype} if dtype is not None else {}
                custom[name] = component_cls.from_pretrained(folder / name, **load_kwargs)
        # Passing None keeps diffusers from resolving the custom library; the real modules are registered after.
        pipe = super().from_pretrained(folder, **kwargs, **{name: None for name in custom})
        if custom:
            pipe.register_modules(**custom)
        return pipe
