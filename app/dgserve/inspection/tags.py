"""Request tags: ``key:value`` pairs a client attaches to an inference, kept with its record.

Researchers send labelled images through the server (``truth:cat``, ``split:val``,
``camera:7``) and later filter and group the records by them. Every front-end parses
tags here, so the rules and messages are the same on ``/v1`` and the Open Inference
Protocol:

* at most ``MAX_TAGS`` per request, each key at most once;
* a key is 1-64 characters of letters, digits, ``_ . -``, starting with a letter;
* a value is 1-128 characters of letters, digits, ``_ . - : / @ +``. No spaces, commas
  or ``=``: a tag list then fits one OIP string parameter (``"truth:cat,split:val"``)
  and one URL parameter without quoting, and stays readable in logs.

Stores keep a record's tags as ``canonical`` JSON (keys sorted, compact), so that equal
tag sets are equal text: the analysis rollups group by that text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping

from dgserve.errors import InvalidTagError

__all__ = ["MAX_TAGS", "Tags", "canonical", "from_canonical", "parse_filters", "parse_list", "parse_pairs", "validate"]

MAX_TAGS = 16
_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
_VALUE = re.compile(r"^[A-Za-z0-9_.:/@+-]{1,128}$")

Tags = dict[str, str]


def _check(key: str, value: str, where: str) -> None:
    if not _KEY.fullmatch(key):  # fullmatch: "$" alone would let a trailing newline through
        raise InvalidTagError(
            f"{where}: tag key {key!r} must be 1-64 letters, digits, '_', '.' or '-', starting with a letter"
        )
    if not _VALUE.fullmatch(value):
        raise InvalidTagError(
            f"{where}: tag {key!r} has value {value!r}; a value is 1-128 letters, digits or any of _ . - : / @ +"
        )


def _split(item: str, where: str) -> tuple[str, str]:
    key, sep, value = item.partition(":")
    if not sep:
        raise InvalidTagError(f"{where}: {item!r} is not key:value")
    return key, value


def parse_pairs(items: Iterable[str], where: str = "tag") -> Tags:
    """``["truth:cat", "split:val"]`` -> ``{"truth": "cat", "split": "val"}``, validated.

    A value may itself hold ``:`` (``time:12:30``): the first one separates the key.
    """
    tags: Tags = {}
    for item in items:
        key, value = _split(item, where)
        _check(key, value, where)
        if key in tags:
            raise InvalidTagError(f"{where}: tag {key!r} is given twice")
        tags[key] = value
    if len(tags) > MAX_TAGS:
        raise InvalidTagError(f"{where}: {len(tags)} tags; at most {MAX_TAGS}")
    return tags


def parse_list(text: str, where: str = "tags") -> Tags:
    """An OIP ``tags`` parameter: ``"truth:cat,split:val"``; spaces around items are dropped, empty is no tags."""
    return parse_pairs([item.strip() for item in text.split(",") if item.strip()], where)


def validate(tags: Mapping[str, str], where: str = "tags") -> Tags:
    """``tags`` checked by the same rules, as a plain dict (for records built in code)."""
    if not isinstance(tags, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items()):
        raise InvalidTagError(f"{where} must map strings to strings")
    for key, value in tags.items():
        _check(key, value, where)
    if len(tags) > MAX_TAGS:
        raise InvalidTagError(f"{where}: {len(tags)} tags; at most {MAX_TAGS}")
    return dict(tags)


def parse_filters(items: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """``?tag=truth:cat`` filters: each must hold; the same key twice can never match
    (a record has one value per key), so it is refused rather than answered empty."""
    return tuple(sorted(parse_pairs(items, "tag filter").items()))


def canonical(tags: Mapping[str, str]) -> str:
    """Compact JSON with sorted keys: equal tag sets give equal text."""
    return json.dumps(dict(sorted(tags.items())), separators=(",", ":"))


def from_canonical(text: str) -> Tags:
    loaded: Tags = json.loads(text) if text else {}
    return loaded
