"""Published config.json files (tests/data/configs) and small helpers for the planner tests."""

from __future__ import annotations

import json
from pathlib import Path

CONFIGS = Path(__file__).parents[2] / "data" / "configs"


def config(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())
