"""Experiments over several training runs: methods (or any config variants) side by side over seeds.

:mod:`~diffdis.experiments.compare` trains each arm in a child process, evaluates every run with the evaluation
API and aggregates over seeds; :mod:`~diffdis.experiments.arms` parses and validates the arms;
:mod:`~diffdis.experiments.report` writes the table, the JSON and the figure. ``diffdis-compare`` and the λ
ablation (``tools/ablation.py``) are their commands.
"""

from .arms import Arm, CompareError, arms_from_file, default_arms, parse_arm, split_overrides, validate_arms
from .compare import CompareSettings, aggregate, mean_std, run_all, run_comparison, run_dir, run_one

__all__ = ["Arm", "CompareError", "CompareSettings", "aggregate", "arms_from_file", "default_arms",
           "mean_std", "parse_arm", "run_all", "run_comparison", "run_dir", "run_one", "split_overrides", "validate_arms"]
