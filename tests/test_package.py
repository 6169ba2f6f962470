"""Package-level behaviour: importing diffdis keeps the console quiet, but not silent."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_import_hides_only_the_torchvision_fallback_notice():
    import diffdis  # noqa: F401  (installs the filter)

    logger = logging.getLogger("transformers.utils.import_utils")
    make = lambda msg: logging.LogRecord(logger.name, logging.WARNING, __file__, 1, msg, None, None)  # noqa: E731
    notice = "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`"
    assert not all(f.filter(make(notice)) for f in logger.filters)
    assert all(f.filter(make("Could not import module 'X'")) for f in logger.filters)


@pytest.mark.slow
def test_pipelines_import_prints_nothing():
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", "import diffdis.pipelines"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torchvision" not in proc.stderr, proc.stderr[-2000:]
