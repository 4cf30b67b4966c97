"""Prompt-lookup proposals on token ids alone: what a row's last tokens find in its own sequence
and in its siblings' outputs."""

from __future__ import annotations

from model.engine.proposer import NgramIndex, propose


def test_the_latest_earlier_occurrence_is_found_never_the_sequence_itself():
    index = NgramIndex(3, [5, 6, 7, 9, 5, 6, 8, 5, 6])
    assert index.continuation((5, 6), 4) == [8, 5, 6]  # the occurrence at 4, not the last one
    assert index.continuation((6,), 2) == [8, 5]
    assert index.continuation((9, 5, 6), 1) == [8]
    assert index.continuation((4,), 3) == []
    alone = NgramIndex(2, [1, 2])
    assert alone.continuation((1, 2), 3) == []  # its only occurrence is its own end


def test_appending_extends_the_index_as_building_it_whole_does():
    tokens = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4]
    grown = NgramIndex(3, tokens[:7])
    for token in tokens[7:]:
        grown.extend([token])
    whole = NgramIndex(3, tokens)
    for n in (1, 2, 3):
        for start in range(len(tokens) - n + 1):
            gram = tuple(tokens[start : start + n])
            assert grown.continuation(gram, 5) == whole.continuation(gram, 5)


def test_the_longest_match_wins_and_a_row_with_nothing_to_go_on_gets_no_proposal():
    # "the cat sat on the mat . the cat" -> 2-gram "the cat" continues "sat on"
    own = NgramIndex(3, [1, 2, 3, 4, 1, 5, 6, 1, 2])
    assert propose(own, [], 2) == (2, [3, 4])
    assert propose(NgramIndex(3, [1, 2, 3]), [], 4) == (0, [])


def test_a_siblings_output_is_used_when_the_row_has_not_seen_the_tokens():
    own = NgramIndex(3, [10, 11, 12, 20, 21])  # prompt ... "<answer>" = 20 21
    sibling = NgramIndex(3, [20, 21, 30, 31, 22])  # "<answer>nine</answer>"
    assert propose(own, [sibling], 3) == (2, [30, 31, 22])
    assert propose(own, [], 3) == (0, [])


def test_a_proposal_never_exceeds_its_limit():
    own = NgramIndex(2, [7, 1, 2, 3, 4, 5, 6, 7])
    assert propose(own, [], 3) == (1, [1, 2, 3])  # "7" alone matched
    assert propose(own, [], 0) == (0, [])
