"""What the pass and the reference engine are told: one small, validated settings object."""
from __future__ import annotations

from dataclasses import dataclass

from edgesparse import EdgesparseError


@dataclass(frozen=True)
class Settings:
    """keep:         fraction of each FFN's intermediate neurons kept for decode (core neurons)
    rho:          token-wise core neurons: top rho fraction of a token's positive activations
    neuron_layers: (first, last) layers whose decode FFN runs on the core neurons only, inclusive;
                  None: every layer
    token_layers: (first, last) layers after whose FFN non-core image tokens are removed, inclusive;
                  None: no token pruning (CoreInfer, neuron-only)
    min_tokens:   never keep fewer than this fraction of a sequence's prunable tokens at one layer
    slice_decode: False: the core neurons only score tokens, every decode FFN stays dense
    """

    keep: float = 0.4
    rho: float = 0.2
    neuron_layers: tuple[int, int] | None = None
    token_layers: tuple[int, int] | None = None
    min_tokens: float = 0.0
    slice_decode: bool = True

    def check(self, layers: int) -> "Settings":
        if not 0.0 < self.keep <= 1.0:
            raise EdgesparseError(f"corematching: keep={self.keep} must be in (0, 1] (a keep ratio of 0 keeps no neuron)")
        if not 0.0 < self.rho <= 1.0:
            raise EdgesparseError(f"corematching: rho={self.rho} must be in (0, 1]")
        if not 0.0 <= self.min_tokens <= 1.0:
            raise EdgesparseError(f"corematching: min_tokens={self.min_tokens} must be in [0, 1]")
        for name in ("neuron_layers", "token_layers"):
            span = getattr(self, name)
            if span is None:
                continue
            first, last = span
            if not 0 <= first <= last < layers:
                raise EdgesparseError(f"corematching: {name}={first}-{last} is outside the model's layers 0-{layers - 1}")
        return self

    def prunes_neurons(self, layer: int) -> bool:
        if not self.slice_decode:
            return False
        return self.neuron_layers is None or self.neuron_layers[0] <= layer <= self.neuron_layers[1]

    def prunes_tokens(self, layer: int) -> bool:
        return self.token_layers is not None and self.token_layers[0] <= layer <= self.token_layers[1]


def parse_span(text: str) -> tuple[int, int] | None:
    """'' or 'all' -> None; '5-18' -> (5, 18); '7' -> (7, 7)."""
    text = str(text).strip()
    if text in ("", "all", "none"):
        return None
    try:
        first, _, last = text.partition("-")
        return int(first), int(last or first)
    except ValueError:
        raise EdgesparseError(f"corematching: layer range '{text}' must look like 5-18") from None
