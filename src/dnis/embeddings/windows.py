"""Reading every looked-up row's stored values as one fixed-width window of a flat buffer.

Compact tables (block-mixed, ragged, quantized blocks) keep each row's values contiguous in one
1-D buffer. A batch lookup reads, for every row, the `window` entries from the row's first one:
one gather of whole windows instead of an index per stored entry.
"""

from __future__ import annotations

import torch


def exporting() -> bool:
    """Whether a TorchScript trace or an ONNX export is running: strided views and bit ops have
    no form there, so lookups take their plain-index path."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def read_windows(
    flat: torch.Tensor, first: torch.Tensor, slots: torch.Tensor, strided: bool
) -> torch.Tensor:
    """[N, W] the W = len(slots) consecutive entries of 1-D `flat` from each of `first` [N]
    (every window inside `flat`; `slots` is arange(W)). `strided`: through one overlapping view
    of `flat` (no index per entry; no cheap gradient, no ONNX form); otherwise through a flat
    index."""
    window = slots.numel()
    if strided:
        return flat.as_strided((flat.numel() - window + 1, window), (1, 1)).index_select(0, first)
    return flat.index_select(0, (first.unsqueeze(1) + slots).reshape(-1)).view(-1, window)
