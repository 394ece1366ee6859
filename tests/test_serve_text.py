"""`TextAssembler`, the streamed text of one request: characters split over tokens are never shown half, stop
strings are found across token boundaries and left out, and the pieces always add up to the decoded text."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncbatch.serve.text import TextAssembler


class ByteTokenizer:
    """One token per UTF-8 byte, decoded as a byte-level tokenizer does: an incomplete character is U+FFFD."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def _feed(text: str, stop: tuple[str, ...] = ()) -> tuple[list[str], TextAssembler]:
    asm = TextAssembler(ByteTokenizer(), stop)
    pieces = [asm.add(b) for b in text.encode()]
    return [*pieces, asm.flush()], asm


def test_a_character_split_over_tokens_appears_once_whole():
    pieces, _ = _feed("né ü€")

    assert "né ü€" == "".join(pieces)
    assert not any("\ufffd" in p for p in pieces)
    assert ["n", "", "é", " ", "", "ü", "", "", "€", ""] == pieces


@pytest.mark.parametrize(("text", "stop", "shown"), [
    ("hello world", ("lo w",), "hel"),  # across several tokens
    ("hello world", ("zzz", "o"), "hell"),  # the earliest of several
    ("hello world", ("world",), "hello "),
    ("hello world", ("nope",), "hello world"),  # held back, then flushed
    ("héllo", ("é",), "h"),
])
def test_stop_strings_end_the_text_just_before_them(text, stop, shown):
    pieces, asm = _feed(text, stop)

    assert shown == "".join(pieces) == asm.text
    assert (shown != text) == asm.stopped


@given(st.text(max_size=40), st.lists(st.text(min_size=1, max_size=4), max_size=3))
def test_the_pieces_are_the_text_up_to_the_first_stop_string(text, stops):
    pieces, asm = _feed(text, tuple(stops))

    # Generation ends at the first token that completes a stop string; what came after it never exists. So the
    # text is cut at the leftmost stop string found in the shortest prefix that holds one.
    ends = [text.find(s) + len(s) for s in stops if s in text]
    seen = text[: min(ends)] if ends else text
    hits = [seen.find(s) for s in stops if s in seen]
    assert (seen[: min(hits)] if hits else text) == "".join(pieces)
