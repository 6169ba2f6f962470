"""Evaluation: reference attribute classifier, prompt adherence, FID."""

from diffdis.eval.adherence import adherence_prompts, prompt_adherence
from diffdis.eval.fid import FeatureExtractor, compute_fid, fid_report, inception_extractor, reference_extractor
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
    "adherence_prompts",
    "compute_fid",
    "dataset_tensors",
    "evaluate_classifier",
    "fid_report",
    "inception_extractor",
    "load_or_train_reference_classifier",
    "pixel_colour",
    "prompt_adherence",
    "reference_extractor",
    "train_reference_classifier",
]
