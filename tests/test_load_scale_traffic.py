"""The load bench's traffic for several replicas (bench/load.py, as bench/scale.py runs it):
users asking in a shuffled order, one passage with most of the questions, a long system prompt
before every question, and the replica that answered each request."""

from __future__ import annotations

from collections import Counter

import pytest

from bench import load, scale
from server.prompts import ANSWER_SYSTEM_PROMPT


def test_clients_ask_every_question_once_in_a_seeded_order_at_most_n_at_a_time():
    passages = load.passage_questions(0, 4)
    plan = load.plan_clients(passages, 8, num_clients=3, seed=1)
    asked = [spec.question.id for spec in plan]
    assert sorted(asked) == sorted(q.id for qs in passages for q in qs)
    assert asked != [q.id for qs in passages for q in qs]  # shuffled
    assert asked == [spec.question.id for spec in load.plan_clients(passages, 8, 3, seed=1)]
    assert asked != [spec.question.id for spec in load.plan_clients(passages, 8, 3, seed=2)]
    # three chains: the first three at once, then each after the one three places before it
    assert [spec.after for spec in plan] == [None] * 3 + list(range(len(plan) - 3))


def test_a_hot_passage_takes_the_others_questions_until_it_holds_its_share():
    passages = load.passage_questions(0, 8)
    skewed = load.skew_passages(passages, 0.6)
    assert [len(qs) for qs in skewed] == [24, 2, 2, 2, 2, 2, 3, 3]
    hot = skewed[0]
    assert hot[:5] == passages[0]  # its own questions first, untouched
    moved = hot[5:]
    assert {q.context_index for q in hot} == {0} and {q.context for q in hot} == {
        passages[0][0].context}
    assert all(q.answers == () for q in moved)  # asked about another passage: no gold answer
    others = {q.question for qs in passages[1:] for q in qs}
    assert {q.question for q in moved} <= others
    assert sum(len(qs) for qs in skewed) == 40
    # every other passage keeps a question, however large the share
    assert [len(qs) for qs in load.skew_passages(passages, 0.99)] == [33] + [1] * 7


def test_a_system_prompt_file_goes_before_every_question_and_only_there(tmp_path):
    prompt = tmp_path / "instructions.txt"
    prompt.write_text("Answer from the passage only.\n")
    args = load.parse_args(["--url", "u", "--scenario", "mixed", "--contexts", "1",
                            "--system-prompt-file", str(prompt)])
    plan = load.build_plan(args)
    questions = [spec for spec in plan if spec.kind == "question"]
    assert {spec.messages[0]["content"] for spec in questions} == {prompt.read_text()}
    (longest,) = [spec for spec in plan if spec.kind == "long"]
    assert longest.messages[0]["content"] == load.LONG_SYSTEM_PROMPT
    plain = load.build_plan(load.parse_args(["--url", "u", "--scenario", "burst"]))
    assert plain[0].messages[0]["content"] == ANSWER_SYSTEM_PROMPT


def test_the_shipped_system_prompt_is_a_retrieval_apps_long_instructions(tmp_path):
    text = scale.SYSTEM_PROMPT_FILE.read_text()
    assert 2000 < len(text) < 4000  # about 600 tokens of the embedded model
    assert "<answer></answer>" in text  # answers still come in tags, so they are scored


@pytest.mark.parametrize("flags", [["--hot-share", "1"], ["--hot-share", "-0.1"],
                                   ["--scenario", "rate", "--request-rate", "1",
                                    "--hot-share", "0.5"],
                                   ["--system-prompt-file", "/nonexistent/prompt.txt"],
                                   ["--clients", "0"]])
def test_bad_traffic_flags_are_refused(flags, capsys):
    argv = ["--url", "u", "--scenario", "burst", *flags]
    if "rate" in flags:
        argv = ["--url", "u", *flags]
    with pytest.raises(SystemExit):
        load.parse_args(argv)
    assert "error" in capsys.readouterr().err


def test_questions_without_gold_answers_are_counted_but_not_scored():
    scored = load.RequestRecord("question", 0, "q1", ["blue"], None, end_s=1.0,
                                text="<answer>blue</answer>", prompt_tokens=10)
    moved = load.RequestRecord("question", 0, "q2", [], None, end_s=1.0, text="no idea",
                               prompt_tokens=10)
    summary = load.summarize([scored, moved])
    assert summary["completed"] == 2 and summary["prompt_tokens_billed"] == 20
    assert summary["em"] == summary["f1"] == 1.0


def test_each_record_names_the_replica_that_answered(start_server):
    server = start_server(max_wait_ms=5.0, replica_name="replica-x")
    result = load.run_load(load.parse_args([
        "--url", server.url, "--scenario", "clients", "--contexts", "2", "--clients", "2",
        "--hot-share", "0.6", "--max-tokens", "2"]))
    (round_,) = result["rounds"]
    records = round_["requests"]
    assert Counter(r["replica"] for r in records) == {"replica-x": 10}
    assert Counter(r["passage"] for r in records) == {0: 6, 1: 4}
    assert round_["summary"]["completed"] == 10 and round_["summary"]["f1"] is not None
    assert result["config"]["clients"] == 2 and result["config"]["hot_share"] == 0.6
