"""embedstore: predict spatial gene expression from H&E through an embedding store."""

from __future__ import annotations

__version__ = "0.1.0"
