"""The sweep's progress bar: one ``tqdm`` bar over the runs on stderr, with the current
run's loss and throughput as its postfix. tqdm switches itself off when stderr is not a
terminal (CI logs, files), so logs stay quiet; ``enabled=False`` switches it off anywhere.
"""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm.auto import tqdm


class Progress:
    def __init__(self, total: int, desc: str, *, enabled: bool | None = None, stream: TextIO | None = None) -> None:
        self.bar = tqdm(
            total=total, desc=desc, unit="run", file=stream if stream is not None else sys.stderr,
            disable=None if enabled is None else not enabled, dynamic_ncols=True, mininterval=0.5,
        )
        self.enabled = not self.bar.disable

    def update(self, n: int = 1, note: str = "") -> None:
        """Advance by ``n`` runs (0: only show ``note``, e.g. a training step's loss)."""
        if note:
            self.bar.set_postfix_str(note, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()
