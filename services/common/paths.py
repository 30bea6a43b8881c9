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

    def resolve(self, path: str | Path) -> Path:
        """``path`` as given, unless it is a relative ``var/...`` path that names nothing here: then the same
        path under this layout's root. A Ray job's working dir is an upload of the tree without the
        git-ignored var/, so ``var/data/x.jsonl`` on the job's side means the head's NIGHTCAP_VAR/data/x.jsonl."""
        given = Path(path)
        if given.is_absolute() or given.exists() or given.parts[:1] != ("var",):
            return given
        return self.root.joinpath(*given.parts[1:])

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
