"""Package-level behaviour: importing diffdis keeps the console quiet, but not silent; the wheel holds every
module, data file and command; tools/ only wraps the package's commands."""

import logging
import os
import runpy
import shutil
import subprocess
import sys
import zipfile
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


# ---------------------------------------------------------------------------- packaging
COMMANDS = ("train", "sample", "zeroshot", "evaluate", "demo", "cache", "compare")  # installed as diffdis-<name>


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (so the checkout gets no build/ or egg-info folders)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "diffdis", src / "diffdis", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out.glob("diffdis-*.whl")
    return path


def test_wheel_holds_every_module_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = [p.relative_to(ROOT).as_posix() for p in (ROOT / "diffdis").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    missing = [s for s in sources if s.endswith((".py", ".json", ".yaml")) and s not in names]
    assert not missing, f"not in the wheel: {missing}"
    packages = {p.parent for p in (ROOT / "diffdis").rglob("*.py")}
    assert all((folder / "__init__.py").is_file() for folder in packages), "a folder of modules without __init__.py"
    assert {"diffdis/configs/tiny.yaml", "diffdis/configs/sd15.yaml", "diffdis/eval/templates/shape.json"} <= names


def test_wheel_declares_the_commands(wheel):
    with zipfile.ZipFile(wheel) as archive:
        (entry_points,) = [n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt")]
        text = archive.read(entry_points).decode()
    for name in COMMANDS:
        assert f"diffdis-{name} = diffdis.cli.{name}:main" in text, text


def test_installed_copy_finds_its_configs(wheel, tmp_path):
    """--config tiny|sd15 from an installed copy (no checkout on the path): the YAMLs ship inside the package."""
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(target))
    for config in ("tiny", "sd15"):
        proc = subprocess.run([sys.executable, "-m", "diffdis.cli.train", "--config", config, "--print-config", "data.name=embedded"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "max_steps" in proc.stdout
    where = subprocess.run([sys.executable, "-c", "import diffdis; print(diffdis.__file__)"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300).stdout
    assert where.startswith(str(target)), where


def test_tools_only_call_the_package_commands():
    """tools/<name>.py runs diffdis.cli.<name>.main and nothing else (benchmark.py is a tool of its own)."""
    for path in sorted((ROOT / "tools").glob("*.py")):
        if path.name == "benchmark.py":
            continue
        assert path.read_text() == (f"import sys\n\nfrom diffdis.cli.{path.stem} import main\n\n"
                                    f"if __name__ == \"__main__\":\n    sys.exit(main())\n"), path
        assert (ROOT / "diffdis" / "cli" / path.name).is_file()


def test_tools_are_safe_to_import_from_a_spawned_worker():
    """A spawned worker (compare --jobs) re-runs the parent's script as ``__mp_main__``: that must not start the tool.

    Without the ``__main__`` guard the worker would run ``main()`` again, parsing this process's argv, and the
    process pool breaks (``python tools/compare.py --jobs 2`` failed this way).
    """
    for path in sorted((ROOT / "tools").glob("*.py")):
        namespace = runpy.run_path(str(path), run_name="__mp_main__")
        assert callable(namespace["main"]), path
