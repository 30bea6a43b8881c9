"""The one shape every benchmark writes (README "Benchmarks"): var/bench/<area>.json plus a table.

report = BenchReport("generation")
report.add("generate", system="nightcap", model="pythia-160m-shape",
           params={"concurrency": 16}, metrics={"tokens_per_s": 181.0})
report.ratio("pythia-160m-shape/n16_vs_sequential", 6.4)
report.write()   # var/bench/generation.json, and prints the table
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


def machine() -> dict[str, Any]:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {
        "cpus": os.cpu_count(),
        "torch": torch.__version__.split("+")[0],
        "device": device,
        "python": platform.python_version(),
    }


@dataclass
class BenchReport:
    area: str
    results: list[dict[str, Any]] = field(default_factory=list)
    ratios: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, system: str, model: str, params: dict[str, Any], metrics: dict[str, float]) -> None:
        self.results.append({"name": name, "system": system, "model": model, "params": params, "metrics": metrics})

    def ratio(self, name: str, value: float) -> None:
        self.ratios[name] = round(value, 3)

    def write(self, var_dir: Path | None = None) -> Path:
        root = Path(var_dir or os.environ.get("NIGHTCAP_VAR") or "var") / "bench"
        root.mkdir(parents=True, exist_ok=True)
        path = root / f"{self.area}.json"
        path.write_text(
            json.dumps({"machine": machine(), "results": self.results, "ratios": self.ratios}, indent=2) + "\n"
        )
        print(self.table())
        print(f"\nwrote {path}")
        return path

    def table(self) -> str:
        metric_names = sorted({m for r in self.results for m in r["metrics"]})
        header = ["name", "system", "model", "params", *metric_names]
        rows = [
            [
                r["name"],
                r["system"],
                r["model"],
                " ".join(f"{k}={v}" for k, v in r["params"].items()),
                *[_fmt(r["metrics"].get(m)) for m in metric_names],
            ]
            for r in self.results
        ]
        widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in [header, *rows]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines += ["", *[f"{name}: {value}" for name, value in self.ratios.items()]]
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
