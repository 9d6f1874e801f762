"""A JSON-lines log: one object per logged step or epoch, appended and flushed as it happens."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class JsonlLog:
    def __init__(self, path: Path | None):
        self.path = path

    def write(self, **record: Any) -> None:
        if self.path is None:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
