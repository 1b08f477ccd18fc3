"""Statistics as mergeable data: per-shard counters on disk, merged from disk into stats.json."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable


@dataclass
class StageStats:
    """Counters of one stage over one shard (or, merged, over a whole run).

    Invariant, checked by `check_conservation`: rows_in == rows_out + dropped + failed.
    """

    stage: str
    rows_in: int = 0
    rows_out: int = 0
    dropped: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    counters: Counter = field(default_factory=Counter)
    shards: int = 0
    skipped: bool = False

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    @property
    def n_failed(self) -> int:
        return sum(self.failed.values())

    def merge(self, other: "StageStats") -> "StageStats":
        if other.stage != self.stage:
            raise ValueError(f"cannot merge stats of {other.stage} into {self.stage}")
        return StageStats(
            stage=self.stage,
            rows_in=self.rows_in + other.rows_in,
            rows_out=self.rows_out + other.rows_out,
            dropped=self.dropped + other.dropped,
            failed=self.failed + other.failed,
            seconds=self.seconds + other.seconds,
            counters=self.counters + other.counters,
            shards=self.shards + other.shards,
            skipped=self.skipped and other.skipped,
        )

    def check_conservation(self) -> None:
        if self.rows_in != self.rows_out + self.n_dropped + self.n_failed:
            raise AssertionError(
                f"stage {self.stage}: rows_in {self.rows_in} != out {self.rows_out} + dropped "
                f"{self.n_dropped} + failed {self.n_failed}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "dropped": dict(sorted(self.dropped.items())),
            "failed": dict(sorted(self.failed.items())),
            "seconds": round(self.seconds, 3),
            "counters": dict(sorted(self.counters.items())),
            "shards": self.shards,
            "skipped": self.skipped,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StageStats":
        return cls(
            stage=data["stage"],
            rows_in=int(data["rows_in"]),
            rows_out=int(data["rows_out"]),
            dropped=Counter(data.get("dropped", {})),
            failed=Counter(data.get("failed", {})),
            seconds=float(data.get("seconds", 0.0)),
            counters=Counter(data.get("counters", {})),
            shards=int(data.get("shards", 0)),
            skipped=bool(data.get("skipped", False)),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


def merge_all(stage: str, items: Iterable[StageStats]) -> StageStats:
    total = StageStats(stage=stage, skipped=True)
    any_item = False
    for item in items:
        total = total.merge(item)
        any_item = True
    if not any_item:
        total.skipped = False
    return total
