"""Questions from a GSM8K-style JSONL file (one object with a ``question`` field per line)."""

from __future__ import annotations

import json
from pathlib import Path

from moe_routes import REPO_ROOT

# The GSM8K test split every checkout has beside it (../shared; MIT, openai/grade-school-math).
SHARED_GSM8K = REPO_ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"


class PromptsFileError(ValueError):
    """``str()`` names the file and line to fix."""


def read_questions(path: str | Path, limit: int | None = None) -> list[str]:
    """The first `limit` questions (all when None), in file order; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise PromptsFileError(f"{path} does not exist")
    out: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            try:
                question = json.loads(line)["question"]
            except (ValueError, KeyError, TypeError):
                raise PromptsFileError(f"{path}:{lineno}: expected a JSON object with a 'question' field") from None
            if not isinstance(question, str):
                raise PromptsFileError(f"{path}:{lineno}: 'question' must be a string")
            out.append(question)
    return out
