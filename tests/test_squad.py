"""bench/squad.py: the official SQuAD scores on known cases, and the seeded selection."""

import json

import pytest

from bench import squad

# --- scores ---


def test_normalize_answer_follows_the_official_script():
    assert squad.normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert squad.normalize_answer("an apple, a pear") == "apple pear"
    # articles are whole words only; punctuation goes before the article check
    assert squad.normalize_answer("Theatre-goers") == "theatregoers"
    assert squad.normalize_answer("the-end") == "theend"


def test_exact_match_known_cases():
    # Super Bowl 50 (dev id 56be4db0acb8001400a502ec): "Which NFL team represented the AFC?"
    assert squad.exact_match("the Denver Broncos.", "Denver Broncos") == 1.0
    assert squad.exact_match("Denver", "Denver Broncos") == 0.0


def test_f1_known_cases():
    assert squad.f1_score("Denver Broncos team", "Denver Broncos") == pytest.approx(0.8)
    # precision 1/1, recall 1/2
    assert squad.f1_score("Broncos", "the Denver Broncos") == pytest.approx(2 / 3)
    assert squad.f1_score("Carolina Panthers", "Denver Broncos") == 0.0
    # repeated tokens count once per occurrence in the gold (Counter intersection)
    assert squad.f1_score("a a a b", "a b") == pytest.approx(1.0)  # articles drop: "b" vs "b"
    assert squad.f1_score("x x y", "x y") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))


def test_lenient_match_gives_empty_answers_zero():
    assert squad.lenient_match("a hemicycle shape", "hemicycle") == 1.0
    assert squad.lenient_match("hemicycle", "the hemicycle of seats") == 1.0
    assert squad.lenient_match("", "hemicycle") == 0.0
    assert squad.lenient_match("the", "hemicycle") == 0.0  # normalizes to empty
    assert squad.lenient_match("circle", "hemicycle of seats") == 0.0


def test_score_answer_needs_tags_for_em_and_takes_the_best_gold():
    # dev id 56be4db0acb8001400a502ee: "Where did Super Bowl 50 take place?"
    golds = ("Santa Clara, California", "Levi's Stadium",
             "Levi's Stadium in the San Francisco Bay Area at Santa Clara, California.")
    tagged = squad.score_answer("It was played at <answer>Levi's Stadium</answer>.", golds)
    assert tagged == {"answer": "Levi's Stadium", "has_tags": True,
                      "em": 1.0, "f1": 1.0, "lenient": 1.0}
    untagged = squad.score_answer("Levi's Stadium", golds)
    assert untagged["answer"] is None and untagged["em"] == 0.0
    assert untagged["f1"] == 1.0 and untagged["lenient"] == 1.0


def test_score_answer_uses_the_first_tag_span_only():
    scores = squad.score_answer("<answer>1990</answer> or <answer>1991</answer>", ("1991",))
    assert scores["answer"] == "1990" and scores["em"] == 0.0


def test_score_answer_with_empty_tags():
    scores = squad.score_answer("<answer> </answer>", ("hemicycle",))
    assert scores == {"answer": "", "has_tags": True, "em": 0.0, "f1": 0.0, "lenient": 0.0}


# --- selection ---


def _synthetic_squad(num_paragraphs: int = 12) -> dict:
    """Paragraph p has 3 + p % 5 questions, so some fall below the five-question bar."""
    paragraphs = [
        {
            "context": f"context {p}",
            "qas": [
                {"id": f"p{p}q{q}", "question": f"question {q} of {p}",
                 "answers": [{"text": f"answer {p}.{q}", "answer_start": 0}]}
                for q in range(3 + p % 5)
            ],
        }
        for p in range(num_paragraphs)
    ]
    return {"data": [{"title": "A", "paragraphs": paragraphs[:5]},
                     {"title": "B", "paragraphs": paragraphs[5:]}]}


def test_select_contexts_is_seeded_and_keeps_the_first_five_questions():
    data = _synthetic_squad()
    first = squad.select_contexts(data, num_contexts=4, seed=42)
    assert first == squad.select_contexts(data, num_contexts=4, seed=42)
    eligible = {f"context {p}" for p in range(12) if 3 + p % 5 >= 5}
    assert {c["context"] for c in first} <= eligible and len(first) == 4
    for item in first:
        p = int(item["context"].split()[1])
        assert [q["id"] for q in item["questions"]] == [f"p{p}q{q}" for q in range(5)]
    all_eligible = squad.select_contexts(data, num_contexts=100, seed=42)
    assert len(all_eligible) == len(eligible)
    orders = {tuple(c["context"] for c in squad.select_contexts(data, 100, seed))
              for seed in range(10)}
    assert len(orders) > 1  # the seed really shuffles


def test_load_selection_from_a_full_file(tmp_path):
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(_synthetic_squad()))
    selection = squad.load_selection(3, str(path), seed=7)
    assert selection == squad.select_contexts(_synthetic_squad(), 3, 7)


def test_shipped_selection_has_100_contexts_of_five_questions():
    shipped = json.loads(squad.SELECTION_FILE.read_text())
    assert shipped["seed"] == 42 and len(shipped["contexts"]) == 100
    ids = [q["id"] for c in shipped["contexts"] for q in c["questions"]]
    assert len(ids) == 500 == len(set(ids))
    assert all(len(c["questions"]) == 5 for c in shipped["contexts"])
    assert squad.load_selection(8) == shipped["contexts"][:8]


def test_load_selection_refuses_what_the_shipped_file_cannot_give():
    with pytest.raises(SystemExit, match="seed 42"):
        squad.load_selection(8, seed=1)
    with pytest.raises(SystemExit, match="--squad"):
        squad.load_selection(101)


def test_groups_are_context_pure_and_split_five_as_two_two_one():
    selection = squad.load_selection(3)
    groups = squad.make_groups(selection, 2)
    assert [len(g.questions) for g in groups] == [2, 2, 1] * 3
    assert all(g.is_context_pure for g in groups)
    flat = [q.id for g in groups for q in g.questions]
    assert flat == [q["id"] for c in selection for q in c["questions"]]
    for group in groups:
        index = group.questions[0].context_index
        assert all(q.context == selection[index]["context"] for q in group.questions)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5])
def test_faithful_chunks_are_the_flat_list_trimmed_to_480(size):
    selection = squad.load_selection(100)
    groups = squad.make_groups(selection, size, faithful=True)
    assert len(groups) == 480 // size and all(len(g.questions) == size for g in groups)
    flat = [q.id for g in groups for q in g.questions]
    assert flat == [q["id"] for c in selection for q in c["questions"]][:480]
    mixed = [g for g in groups if not g.is_context_pure]
    assert bool(mixed) == (size in (2, 3, 4))  # 5 questions per context: G=1 and G=5 stay pure
