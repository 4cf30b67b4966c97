"""Incremental detokenization: stop strings and partial characters are never released early."""

from __future__ import annotations

import pytest

from model.engine.text_stream import TextStream
from model.weights.tiny import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def feed(stream: TextStream, tokenizer, text: str) -> list[str]:
    deltas = []
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        deltas.append(stream.add(token))
        if stream.is_stopped:
            break
    return deltas


def test_plain_text_streams_through(tokenizer):
    stream = TextStream(tokenizer)
    assert "".join(feed(stream, tokenizer, "hello world")) == "hello world"


def test_stop_string_spanning_tokens_ends_the_text_before_it(tokenizer):
    stream = TextStream(tokenizer, stop=("</answer>",))
    deltas = feed(stream, tokenizer, "<answer>Paris</answer> and more")
    assert stream.is_stopped
    assert "".join(deltas) == "<answer>Paris"
    assert stream.flush() == ""


def test_possible_stop_prefix_is_held_back_then_released(tokenizer):
    stream = TextStream(tokenizer, stop=("STOP",))
    deltas = feed(stream, tokenizer, "ab ST")
    assert "".join(deltas) == "ab "
    assert stream.flush() == "ST"
    assert stream.text == "ab ST"


def test_earliest_of_several_stops_wins(tokenizer):
    stream = TextStream(tokenizer, stop=("zz", "b"))
    assert "".join(feed(stream, tokenizer, "aabzz")) == "aa"


def test_multibyte_character_is_released_whole(tokenizer):
    stream = TextStream(tokenizer)
    deltas = feed(stream, tokenizer, "é")  # two byte-tokens
    assert deltas == ["", "é"]
