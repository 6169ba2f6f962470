"""Command-line entry points: ``main(argv=None) -> exit status`` per command.

Installed as console scripts (``diffdis-train``, ``diffdis-sample``, ...), runnable as
``python -m diffdis.cli.<name>``, and wrapped by the scripts in ``tools/`` (so that
``accelerate launch tools/train.py`` works from a checkout). Each parses arguments, calls the
library and prints; a bad input is one line on stderr and exit status 2.
"""

from __future__ import annotations

import os
import site
import sys
from pathlib import Path
from typing import Dict, List

PACKAGE_PARENT = Path(__file__).resolve().parent.parent.parent  # the folder that holds this diffdis package


def module_command(name: str) -> List[str]:
    """``python -m diffdis.cli.<name>`` with this interpreter."""
    return [sys.executable, "-m", f"diffdis.cli.{name}"]


def child_env(**extra: str) -> Dict[str, str]:
    """This process's environment for a child Python process that must import this same diffdis.

    A checkout that is not installed (or another copy that is) would otherwise be shadowed in the
    child: its folder goes first on ``PYTHONPATH``, unless it is a site-packages folder already.
    """
    env = dict(os.environ, **extra)
    installed = {Path(p).resolve() for p in site.getsitepackages() + [site.getusersitepackages()]}
    if PACKAGE_PARENT not in installed:
        env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_PARENT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return env
