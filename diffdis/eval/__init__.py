"""Evaluation: reference attribute classifier, prompt adherence, FID.

The evaluation runs themselves (zero-shot classification, retrieval, generation quality, a whole
model and its report) are :mod:`diffdis.eval.api`.
"""

from diffdis.eval.adherence import adherence_counts, adherence_from_counts, adherence_prompts, prompt_adherence
from diffdis.eval.fid import (
    FeatureExtractor,
    accumulate_real_statistics,
    compute_fid,
    fid_metric_report,
    fid_report,
    inception_extractor,
    new_fid_metric,
    reference_extractor,
    sum_fid_states,
    update_fid,
)
from diffdis.eval.reference import (
    AttributeClassifier,
    dataset_tensors,
    evaluate_classifier,
    load_or_train_reference_classifier,
    pixel_colour,
    train_reference_classifier,
)

__all__ = [
    "AttributeClassifier",
    "FeatureExtractor",
    "accumulate_real_statistics",
    "adherence_counts",
    "adherence_from_counts",
    "adherence_prompts",
    "compute_fid",
    "dataset_tensors",
    "evaluate_classifier",
    "fid_metric_report",
    "fid_report",
    "inception_extractor",
    "load_or_train_reference_classifier",
    "new_fid_metric",
    "pixel_colour",
    "prompt_adherence",
    "reference_extractor",
    "sum_fid_states",
    "train_reference_classifier",
    "update_fid",
]
