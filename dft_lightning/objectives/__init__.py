"""Training objectives: one small class each, selected in YAML by ``model.objective.class_path``."""

from dft_lightning.objectives.asft import ASFT
from dft_lightning.objectives.base import (
    KNOWN_REQUIREMENTS,
    Objective,
    ObjectiveOutput,
    TokenStats,
    build_objective,
    objective_spec,
)
from dft_lightning.objectives.chord import CHORD
from dft_lightning.objectives.dft import DFT
from dft_lightning.objectives.dft_sequence import DFTSequence
from dft_lightning.objectives.dpo import DPO
from dft_lightning.objectives.eaft import EAFT
from dft_lightning.objectives.focal import Focal
from dft_lightning.objectives.iw_sft import IWSFT
from dft_lightning.objectives.prob_power import ProbPower
from dft_lightning.objectives.psft import PSFT
from dft_lightning.objectives.sadft import SADFT
from dft_lightning.objectives.sft import SFT

__all__ = [
    "ASFT",
    "CHORD",
    "DFT",
    "DPO",
    "EAFT",
    "IWSFT",
    "PSFT",
    "SADFT",
    "KNOWN_REQUIREMENTS",
    "SFT",
    "DFTSequence",
    "Focal",
    "Objective",
    "ObjectiveOutput",
    "ProbPower",
    "TokenStats",
    "build_objective",
    "objective_spec",
]
