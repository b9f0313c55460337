"""The tag rules every front-end applies (``dgserve.inspection.tags``)."""

from __future__ import annotations

import pytest

from dgserve.errors import InvalidTagError
from dgserve.inspection.tags import MAX_TAGS, canonical, from_canonical, parse_filters, parse_list, parse_pairs


def test_pairs_parse_with_colons_in_values() -> None:
    assert parse_pairs(["truth:cat", "time:12:30", "src:s3://b/k@v+1"]) == {
        "truth": "cat", "time": "12:30", "src": "s3://b/k@v+1"
    }  # fmt: skip
    assert parse_list("truth:cat, split:val,") == {"truth": "cat", "split": "val"}
    assert parse_list("  ") == {}


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["nocolon"], "is not key:value"),
        (["9key:v"], "starting with a letter"),
        (["k y:v"], "tag key"),
        (["k:"], "a value is 1-128"),
        (["k:a b"], "a value is 1-128"),
        (["k:a,b"], "a value is 1-128"),
        (["k:" + "v" * 129], "a value is 1-128"),
        (["k" * 65 + ":v"], "tag key"),
        (["k:a", "k:b"], "given twice"),
        ([f"k{i}:v" for i in range(MAX_TAGS + 1)], f"at most {MAX_TAGS}"),
    ],
)
def test_bad_tags_are_refused_with_the_rule_they_break(items: list[str], message: str) -> None:
    with pytest.raises(InvalidTagError, match=message) as info:
        parse_pairs(items)
    assert info.value.status_code == 422 and info.value.code == "invalid_tag"


def test_canonical_text_is_equal_for_equal_sets_and_reads_back() -> None:
    a, b = canonical({"split": "val", "truth": "cat"}), canonical({"truth": "cat", "split": "val"})
    assert a == b == '{"split":"val","truth":"cat"}'
    assert from_canonical(a) == {"split": "val", "truth": "cat"} and from_canonical("") == {}
    assert parse_filters(["truth:cat", "split:val"]) == (("split", "val"), ("truth", "cat"))


@pytest.mark.parametrize("item", ["truth:cat\n", "truth\n:cat"])
def test_a_trailing_newline_is_no_part_of_a_valid_tag(item: str) -> None:
    with pytest.raises(InvalidTagError):
        parse_pairs([item])
