"""dft_lightning: fine-tune LLMs with pluggable token-level objectives (SFT, DFT, iw-SFT, ...)."""

__version__ = "0.1.0"
