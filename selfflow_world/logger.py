"""One logger for training: console progress bar, CSV always, TensorBoard on by default."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any


class Logger:
    """Writes scalar metrics to ``<run>/metrics.csv`` (and TensorBoard), shows a progress bar.

    On resume, rows after ``start_step`` are dropped from the CSV, so the file of a resumed run reads
    like that of an uninterrupted one.
    """

    def __init__(
        self, run: Path, *, total: int, start_step: int = 0, tensorboard: bool = True, enabled: bool = True
    ):
        self.enabled = enabled
        self.path = Path(run) / "metrics.csv"
        self.rows: list[dict[str, Any]] = []
        self.fields: list[str] = ["step"]
        self.bar = self.writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            with open(self.path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
        self._rewrite()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(
                str(Path(run) / "tb"), purge_step=start_step + 1 if start_step else None
            )
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=start_step, unit="step", dynamic_ncols=True, desc="train")

    def _rewrite(self) -> None:
        self.fields = [
            "step",
            *sorted({k for r in self.rows for k in r if r.get(k) not in (None, "")} - {"step"}),
        ]
        tmp = self.path.with_name(".tmp-metrics.csv")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)
        tmp.replace(self.path)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """One CSV row (and TensorBoard scalars) for ``step``."""
        if not self.enabled:
            return
        row = {"step": step, **{k: f"{float(v):.6g}" for k, v in metrics.items()}}
        self.rows.append(row)
        if set(row) - set(self.fields):
            self._rewrite()  # a new column: rewrite the file with the wider header
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.fields).writerow(row)
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, float(value), step)

    def progress(self, step: int, postfix: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=True)

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
