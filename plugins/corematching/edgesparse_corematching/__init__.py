"""The `corematching` pass: CoreMatching / CoreInfer (papers.md section 4), training-free
co-pruning of tokens and FFN neurons chosen from the prompt. Design and measurements: README.md."""
from __future__ import annotations

__version__ = "0.1.0"
