"""Data: raw rows -> chat records -> supervised tokens -> optimizer-step batches."""

from dft_lightning.data.chat import ChatEncoder, DataReport, FieldMap
from dft_lightning.data.demo import DemoMathDataModule
from dft_lightning.data.module import ChatDataModule

__all__ = ["ChatDataModule", "ChatEncoder", "DataReport", "DemoMathDataModule", "FieldMap"]
