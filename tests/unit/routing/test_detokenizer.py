"""Incremental detokenization with the demo's byte-level BPE tokenizer: whole characters only, stop strings.

In this tokenizer every non-ASCII character spans several tokens (one per UTF-8 byte), so feeding
token by token exercises exactly the cases where a naive per-token decode would emit broken text.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from tokenizers import Tokenizer

from trellis.routing.detokenizer import IncrementalDetokenizer

REPLACEMENT = "\ufffd"
TEXTS = [
    "café au lait",
    "naïve café, 日本語 and 🎉🎉!",
    "日本",
    "é",
    "emoji 🧪 test, then ascii",
]


def feed(detok: IncrementalDetokenizer, ids: Sequence[int], chunk: int = 1) -> list[str]:
    """Every delta, then what flush releases at the end of the stream."""
    deltas = [detok.add(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    return [*deltas, detok.flush()]


@pytest.mark.parametrize("chunk", [1, 2, 3])
@pytest.mark.parametrize("text", TEXTS)
def test_deltas_are_whole_characters_and_add_up_to_the_full_decode(
    demo_tokenizer: Tokenizer, text: str, chunk: int
) -> None:
    ids = demo_tokenizer.encode(text).ids
    assert any(REPLACEMENT in demo_tokenizer.decode([t]) for t in ids)  # some character spans tokens
    deltas = feed(IncrementalDetokenizer(demo_tokenizer, prompt_ids=[]), ids, chunk)
    assert all(REPLACEMENT not in d for d in deltas), deltas
    assert "".join(deltas) == demo_tokenizer.decode(ids) == text


def test_an_incomplete_character_is_held_until_its_last_byte(demo_tokenizer: Tokenizer) -> None:
    ids = demo_tokenizer.encode("日本").ids  # six byte tokens
    assert len(ids) == 6
    detok = IncrementalDetokenizer(demo_tokenizer, prompt_ids=[])
    assert [detok.add([t]) for t in ids] == ["", "", "日", "", "", "本"]


def test_the_prompt_gives_context_but_is_not_repeated(demo_tokenizer: Tokenizer) -> None:
    prompt = demo_tokenizer.encode("Résumé of the café: ").ids
    generated = demo_tokenizer.encode("crème brûlée 🍮 done").ids
    deltas = feed(IncrementalDetokenizer(demo_tokenizer, prompt), generated)
    assert "".join(deltas) == "crème brûlée 🍮 done"
    assert all(REPLACEMENT not in d for d in deltas)


def test_a_stream_cut_inside_a_character_ends_as_the_full_decode(demo_tokenizer: Tokenizer) -> None:
    ids = demo_tokenizer.encode("ok 🎉").ids[:-1]  # the emoji's last byte never comes
    detok = IncrementalDetokenizer(demo_tokenizer, [])
    assert "".join(detok.add([t]) for t in ids) == "ok "  # the partial character is held back...
    assert detok.flush() == REPLACEMENT  # ...and ends as a replacement character, as decode() gives
    assert demo_tokenizer.decode(ids) == "ok " + REPLACEMENT


# (text, stop strings, the text the client must see)
STOP_CASES = [
    ("café au lait", ["u la"], "café a"),  # the match spans three tokens
    ("café au lait", ["é"], "caf"),  # a stop string that is one multi-byte character
    ("café au lait", ["ca"], ""),  # right at the start
    ("café au lait", ["lait", "au"], "café "),  # the earliest match wins, whatever the list order
    ("café au lait", ["xyz"], "café au lait"),  # no match: everything
    ("café au lait", ["lait!"], "café au lait"),  # held back as a possible start, released at the end
    ("naïve café, 日本語 and 🎉🎉!", ["本語"], "naïve café, 日"),
    ("naïve café, 日本語 and 🎉🎉!", ["🎉!"], "naïve café, 日本語 and 🎉"),
    ("aaab then more", ["aab"], "a"),  # a partial match that fails, then a full one
]


@pytest.mark.parametrize("chunk", [1, 2])
@pytest.mark.parametrize(("text", "stop", "expected"), STOP_CASES)
def test_stop_strings_cut_the_text_right_before_the_match(
    demo_tokenizer: Tokenizer, text: str, stop: list[str], expected: str, chunk: int
) -> None:
    ids = demo_tokenizer.encode(text).ids
    detok = IncrementalDetokenizer(demo_tokenizer, [], stop)
    deltas = feed(detok, ids, chunk)
    assert "".join(deltas) == expected
    assert detok.stopped == any(s in text for s in stop)
    assert all(REPLACEMENT not in d for d in deltas)


def test_text_that_may_start_a_stop_string_is_held_back(demo_tokenizer: Tokenizer) -> None:
    detok = IncrementalDetokenizer(demo_tokenizer, [], ["STOP"])
    released = [detok.add([t]) for t in demo_tokenizer.encode("stop here. ST").ids]
    assert "".join(released) == "stop here. "  # "ST" might still become "STOP"
    assert detok.add(demo_tokenizer.encode("OP and more").ids) == ""
    assert detok.stopped
    assert detok.add(demo_tokenizer.encode(" later").ids) == "" and detok.flush() == ""


def test_a_stop_string_in_the_last_delta_is_honoured_by_flush(demo_tokenizer: Tokenizer) -> None:
    """The stream ends on an incomplete character: what flush releases is still cut at a stop string."""
    ids = demo_tokenizer.encode("xab").ids + demo_tokenizer.encode("é").ids[:1]
    detok = IncrementalDetokenizer(demo_tokenizer, [], ["b"])
    assert detok.add(ids) == ""  # ends inside a character: held
    assert detok.flush() == "xa"
    assert detok.stopped


def test_empty_stop_strings_are_ignored(demo_tokenizer: Tokenizer) -> None:
    ids = demo_tokenizer.encode("café").ids
    assert "".join(feed(IncrementalDetokenizer(demo_tokenizer, [], [""]), ids)) == "café"
