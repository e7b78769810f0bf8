"""Progress reporting through a callback: the library never prints, the CLI renders."""

from __future__ import annotations

from typing import Any


class Progress:
    """Callback interface; the default does nothing (tests and library use stay silent)."""

    def epoch_start(self, epoch: int, batches: int) -> None: ...

    def batch_end(self) -> None: ...

    def epoch_end(self, record: dict[str, Any]) -> None: ...


SilentProgress = Progress
