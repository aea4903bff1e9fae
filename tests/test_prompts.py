"""moe_routes.prompts: the one reader of GSM8K-style prompt files (run_generate, tiny models, tests)."""

import pytest

from moe_routes.prompts import SHARED_GSM8K, PromptsFileError, read_questions

pytestmark = pytest.mark.fast


def test_first_questions_of_the_shared_split_in_order():
    qs = read_questions(SHARED_GSM8K, 25)
    assert len(qs) == 25 and all(isinstance(q, str) and q for q in qs)
    assert qs[0].startswith("Janet")  # first row of the GSM8K test split
    assert read_questions(SHARED_GSM8K, 3) == qs[:3]


def test_blank_lines_skipped_and_limit_none_reads_all(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"question": "a"}\n\n{"question": "b", "answer": "x"}\n')
    assert read_questions(f) == ["a", "b"]
    assert read_questions(f, 1) == ["a"]


@pytest.mark.parametrize(
    "text, needle",
    [
        ('{"question": "a"}\nnot json\n', "p.jsonl:2: expected a JSON object with a 'question' field"),
        ('{"q": "a"}\n', "p.jsonl:1: expected a JSON object"),
        ('{"question": 3}\n', "p.jsonl:1: 'question' must be a string"),
    ],
)
def test_bad_lines_are_named(tmp_path, text, needle):
    f = tmp_path / "p.jsonl"
    f.write_text(text)
    with pytest.raises(PromptsFileError, match=needle):
        read_questions(f)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(PromptsFileError, match="nope.jsonl does not exist"):
        read_questions(tmp_path / "nope.jsonl")
