"""Data: raw rows -> chat records -> supervised tokens -> optimizer-step batches."""

from dft_lightning.data.chat import ChatEncoder, DataReport, FieldMap
from dft_lightning.data.code import CodeDataModule, FeedbackFields
from dft_lightning.data.demo import DemoMathDataModule
from dft_lightning.data.math import MathDataModule, MathFields
from dft_lightning.data.module import ChatDataModule
from dft_lightning.data.pairs import PairDataModule, PairFields
from dft_lightning.data.vision import ShapesDataModule, VisionDataModule, VisionFields

__all__ = [
    "ChatDataModule", "ChatEncoder", "CodeDataModule", "DataReport", "DemoMathDataModule", "FeedbackFields",
    "FieldMap", "MathDataModule", "MathFields", "PairDataModule", "PairFields", "ShapesDataModule",
    "VisionDataModule", "VisionFields",
]
