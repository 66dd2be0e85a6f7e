"""Evaluation: generative metrics through torch-fidelity (:mod:`.fidelity`) and task metrics (:mod:`.accuracy`)."""
from mtdiff.evaluation.accuracy import (
    LabelAccuracy,
    class_entropy,
    classifier_accuracy,
    image_mse,
    label_head_accuracy,
    masked_region_mse,
    representation_similarity,
)
from mtdiff.evaluation.fidelity import (
    INCEPTION,
    UInt8Images,
    fidelity_metrics,
    inception_weights,
    load_ref_stats,
    metric_name,
    reference_stats,
    register_module_extractor,
    write_ref_stats_npz,
)

__all__ = [
    "INCEPTION", "LabelAccuracy", "UInt8Images", "class_entropy", "classifier_accuracy", "fidelity_metrics",
    "image_mse", "inception_weights", "label_head_accuracy", "load_ref_stats", "masked_region_mse",
    "metric_name", "reference_stats", "register_module_extractor", "representation_similarity",
    "write_ref_stats_npz",
]
