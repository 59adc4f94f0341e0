"""Pruning front end: importance criteria, calibration, structure choices, masks and plans.

The output is the mask-file contract of ``compile --masks`` (0/1 float32 tensors keyed by torch parameter
name) plus a plan YAML; the compiler turns both into a physically smaller model.
"""

from prune2deploy.pruning.calibration import CalibrationData, load_calibration
from prune2deploy.pruning.masks import apply_masks, check_masks
from prune2deploy.pruning.plan import LayerChoice, Plan, Selection, dump_plan, load_plan
from prune2deploy.pruning.prune import PruneResult, prune_model, prune_module
from prune2deploy.pruning.structures import ModelStructure, detect_structure

__all__ = [
    "CalibrationData",
    "LayerChoice",
    "ModelStructure",
    "Plan",
    "PruneResult",
    "Selection",
    "apply_masks",
    "check_masks",
    "detect_structure",
    "dump_plan",
    "load_calibration",
    "load_plan",
    "prune_model",
    "prune_module",
]
