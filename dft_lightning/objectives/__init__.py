"""Training objectives: one small class each, selected in YAML by ``model.objective.class_path``."""

from dft_lightning.objectives.base import (
    KNOWN_REQUIREMENTS,
    Objective,
    ObjectiveOutput,
    TokenStats,
    build_objective,
    objective_spec,
)
from dft_lightning.objectives.dft import DFT
from dft_lightning.objectives.iw_sft import IWSFT
from dft_lightning.objectives.sft import SFT

__all__ = ["DFT", "IWSFT", "KNOWN_REQUIREMENTS", "SFT", "Objective", "ObjectiveOutput", "TokenStats", "build_objective",
           "objective_spec"]
