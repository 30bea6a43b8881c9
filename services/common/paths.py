"""The runtime folder (default ``var/``): everything a running stack writes lives under it; delete it to reset."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

VAR_ENV = "NIGHTCAP_VAR"


@dataclass(frozen=True)
class VarLayout:
    root: Path

    @classmethod
    def from_env(cls, root: str | Path | None = None) -> VarLayout:
        return cls(Path(root or os.environ.get(VAR_ENV) or "var").resolve())

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def indexes(self) -> Path:
        return self.root / "indexes"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def bench(self) -> Path:
        return self.root / "bench"
