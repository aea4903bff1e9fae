"""The log's record schema: ``schemas/moe_routes.schema.json`` owns the schema version.

Engine modules ship inside vLLM/SGLang and cannot read this repository, so they carry the number as a literal
(``SCHEMA_VERSION = N``); ``moe-routes patch lint`` fails when such a literal differs from the schema file.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

from moe_routes import REPO_ROOT

SCHEMA_PATH = REPO_ROOT / "schemas" / "moe_routes.schema.json"
_ENGINE_LITERAL = re.compile(rb"^SCHEMA_VERSION = (\d+)$", re.MULTILINE)


@cache
def load_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def schema_version() -> int:
    """The version every meta record states (``schema_version``), from the schema file."""
    return int(load_schema()["$defs"]["meta"]["properties"]["schema_version"]["const"])


def engine_literal_problems(source: Path) -> list[str]:
    """An engine module's SCHEMA_VERSION literal that disagrees with the schema file."""
    want = schema_version()
    return [
        f"{source}: SCHEMA_VERSION = {int(m.group(1))} but {SCHEMA_PATH.name} says schema_version {want}; "
        "change one of them so they agree"
        for m in _ENGINE_LITERAL.finditer(source.read_bytes())
        if int(m.group(1)) != want
    ]
