"""Training the group head: answer-step indexing with left padding, the loss, checkpoints, a
smoke run of `python -m train`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bench import engine_bench
from model import cache
from model.forward.decoder import DecoderForward
from model.head.files import shipped_checkpoint
from model.head.group_head import (
    CheckpointMismatchError,
    GroupHead,
    GroupHeadConfig,
    read_checkpoint_config,
)
from model.weights.tiny import build_tiny_model
from train.__main__ import main as train_main
from train.data import Passage, Question, make_examples, read_squad
from train.evaluate import bench_controls, heldout_generation
from train.features import compute_features
from train.loop import answer_logits, answer_loss, batch_tensors, make_groups

SIGNATURE, OTHER_SIGNATURE = (0.25, -0.5, 1.0), (0.25, -0.5, 2.0)
PASSAGES = [
    Passage("Cats sleep most of the day.", (
        Question("Who sleeps?", ("Cats",)),
        Question("How much of the day do they sleep, roughly speaking?", ("most of the day",)),
    )),
    Passage("The river Loire is the longest river in France, 1,006 km from its source.", (
        Question("Which river?", ("the Loire",)),
        Question("In which land?", ("France",)),
        Question("How long is it from the source to the sea?", ("1,006 km",)),
    )),
    Passage("Paris.", (Question("Capital?", ("Paris",)),)),
]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model()


def unpadded_hidden(body, example) -> torch.Tensor:
    """Reference: the row alone, no padding, no shared prefix -> [T, d] at the answer steps."""
    sequence = torch.tensor([example.prompt_ids + example.target_ids])
    with torch.no_grad():
        hidden = body(input_ids=sequence).last_hidden_state[0]
    start = len(example.prompt_ids) - 1  # the last prompt token predicts the first answer token
    return hidden[start : start + len(example.target_ids)]


def test_answer_steps_of_grouped_rows_match_each_row_alone(tiny):
    examples = make_examples(tiny.tokenizer, PASSAGES)
    prompt_lengths = {len(e.prompt_ids) for e in examples}
    assert len(prompt_lengths) == len(examples)  # rows of every length, sharing passages
    body = tiny.model.get_decoder()
    features = compute_features(DecoderForward(tiny.model), examples, passages_per_batch=3)
    assert features.targets.tolist() == [t for e in examples for t in e.target_ids]
    starts = features.row_starts.tolist()
    for row, example in enumerate(examples):
        got = features.hidden[starts[row] : starts[row] + len(example.target_ids)]
        torch.testing.assert_close(got, unpadded_hidden(body, example), atol=1e-4, rtol=1e-4)


def test_loss_equals_per_row_unpadded_cross_entropy(tiny):
    examples = make_examples(tiny.tokenizer, PASSAGES)
    features = compute_features(DecoderForward(tiny.model), examples, passages_per_batch=2)
    groups = make_groups(features, max_group=5, rng=None)
    # an untrained module is the identity, so the loss must be the base model's own
    head = GroupHead(GroupHeadConfig(hidden_size=64, num_heads=4, adapter_rank=2,
                                     vocab_size=tiny.model.config.vocab_size))
    loss = answer_loss(head, tiny.model.get_output_embeddings(), features, groups)
    token_losses = []
    for example in examples:
        sequence = torch.tensor([example.prompt_ids + example.target_ids])
        with torch.no_grad():
            logits = tiny.model(input_ids=sequence).logits[0]
        start = len(example.prompt_ids) - 1
        token_losses.append(F.cross_entropy(
            logits[start : start + len(example.target_ids)], torch.tensor(example.target_ids),
            reduction="none",
        ))
    torch.testing.assert_close(loss, torch.cat(token_losses).mean(), atol=1e-4, rtol=1e-4)


def test_csa_mixes_rows_of_one_group_at_the_same_step_only(tiny):
    examples = make_examples(tiny.tokenizer, PASSAGES)
    features = compute_features(DecoderForward(tiny.model), examples)
    groups = [[0, 1], [2, 3, 4], [5]]  # rows by passage
    hidden, _, group_ids = batch_tensors(features, groups)
    head = GroupHead(GroupHeadConfig(hidden_size=64, num_heads=4))
    torch.nn.init.normal_(head.o_proj.weight, std=0.5)  # no longer the identity
    lm_head = tiny.model.get_output_embeddings()
    logits = answer_logits(head, lm_head, hidden, group_ids)
    lengths = features.row_lengths.tolist()
    # the single row of passage 2 has no peer: unchanged
    torch.testing.assert_close(logits[-lengths[5]:], lm_head(hidden[-lengths[5]:]))
    # rows 0 and 1 mixed step by step: the same as running the pair alone
    pair = sum(lengths[:2])
    alone = answer_logits(head, lm_head, hidden[:pair], group_ids[:pair])
    torch.testing.assert_close(logits[:pair], alone)
    assert not torch.allclose(logits[:pair], lm_head(hidden[:pair]))
    # a step at which only one row of a group is still active is left as it is
    longer, shorter = (0, 1) if lengths[0] > lengths[1] else (1, 0)
    last = sum(lengths[:longer]) + lengths[longer] - 1
    assert lengths[longer] > lengths[shorter]
    torch.testing.assert_close(logits[last], lm_head(hidden[last]))


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    config = GroupHeadConfig(hidden_size=64, num_heads=4, adapter_rank=3, vocab_size=50,
                             head_mlp=8, base_model="tiny-random", base_signature=SIGNATURE)
    meta = {"trained": ["csa", "gate", "lm_head_adapter"], "metrics": {"f1": 0.5}}
    head = GroupHead(config, meta)
    for parameter in head.parameters():
        torch.nn.init.normal_(parameter)
    head.save(tmp_path)
    loaded = GroupHead.load(tmp_path, "tiny-random", SIGNATURE, 64)
    assert loaded.config == config
    assert loaded.meta == meta
    for name, tensor in head.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)
    h, groups = torch.randn(4, 64), torch.tensor([0, 0, 1, 1])
    active = torch.ones(4, dtype=torch.bool)
    torch.testing.assert_close(loaded(h, groups, active), head(h, groups, active))
    with pytest.raises(CheckpointMismatchError, match="trained on tiny-random"):
        GroupHead.load(tmp_path, "other-model", OTHER_SIGNATURE, 64)
    with pytest.raises(CheckpointMismatchError, match="hidden size"):
        GroupHead.load(tmp_path, "tiny-random", SIGNATURE, 128)


def test_head_adapter_starts_as_identity_and_applies_to_every_row():
    config = GroupHeadConfig(hidden_size=64, num_heads=4, adapter_rank=3, vocab_size=50,
                             head_mlp=8, use_csa=False)
    adapter = GroupHead(config)
    assert not hasattr(adapter, "q_proj")  # no CSA weights in an adapter-only module
    h, groups = torch.randn(3, 64), torch.tensor([0, 0, 1])
    active = torch.ones(3, dtype=torch.bool)
    assert torch.equal(adapter(h, groups, active), h)
    assert torch.equal(adapter.head_delta(h), torch.zeros(3, 50))
    torch.nn.init.normal_(adapter.head_mlp[-1].weight)
    out = adapter(h, groups, active)
    assert not torch.allclose(out[2], h[2]), "a group of one gets the head MLP too"
    torch.testing.assert_close(out[2:], adapter(h[2:], groups[2:], active[2:]))


def squad_file(path, passages) -> None:
    articles = [{"title": "t", "paragraphs": [
        {"context": p.context, "qas": [
            {"id": f"{i}-{j}", "question": q.question,
             "answers": [{"text": a, "answer_start": 0} for a in q.answers]}
            for j, q in enumerate(p.questions)
        ]} for i, p in enumerate(passages)
    ]}]
    path.write_text(json.dumps({"version": "1.1", "data": articles}))


def test_read_squad_keeps_passages_and_answers(tmp_path):
    squad_file(tmp_path / "train.json", PASSAGES)
    assert read_squad(tmp_path / "train.json") == PASSAGES


def test_smoke_training_run_lowers_the_loss(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "_directory", cache.cache_dir())  # the run moves it: put it back
    squad_file(tmp_path / "train.json", PASSAGES * 4)
    out = tmp_path / "csa"
    metrics = train_main([
        "--cache", str(tmp_path / "cache"),
        "--model", "tiny-random", "--train", str(tmp_path / "train.json"), "--out", str(out),
        "--heldout", "3", "--max-steps", "20", "--epochs", "20", "--batch-tokens", "64",
        "--lr", "3e-2", "--csa-lr", "3e-2", "--adapter-rank", "4", "--head-mlp", "16",
        "--num-heads", "4",
        "--eval-contexts", "0", "--bench-contexts", "0",
    ])
    losses = metrics["heldout_loss"]
    assert losses["adapter-only"] < losses["base"] - 0.5
    # CSA starts from the trained adapter as the identity and keeps its best weights
    assert losses["csa+adapter"] <= losses["adapter-only"]
    control = GroupHead.load(f"{out}-adapter-only", "tiny-random")
    history = control.meta["history"]
    assert history[-1]["train_loss"] < history[1]["train_loss"]
    assert history[0]["heldout_loss"] == losses["base"]
    assert not control.config.use_csa
    assert control.meta["trained"] == ["adapter_down", "adapter_up", "head_mlp"]
    trained = GroupHead.load(out, "tiny-random")
    assert trained.config.use_csa and "o_proj" in trained.meta["trained"]
    assert "head_mlp" not in trained.meta["trained"]
    assert trained.meta["metrics"]["heldout_loss"] == losses
    # the adapter inside the CSA checkpoint is the control's, untouched
    for name, tensor in control.state_dict().items():
        assert torch.equal(trained.state_dict()[name], tensor)
    # the features were cached: a second run reads them instead of recomputing
    assert len(list((tmp_path / "cache" / "csa-features").glob("*.pt"))) == 1


def test_bench_controls_run_the_bench_on_every_stored_checkpoint(tmp_path):
    head = GroupHead(GroupHeadConfig(hidden_size=64, num_heads=4), {"trained": []})
    head.save(tmp_path / "untrained")
    results = bench_controls({"untrained": tmp_path / "untrained"}, contexts=1,
                             model="tiny-random", max_tokens=8)
    assert set(results) == {"base", "untrained"}
    timing = {"seconds", "questions_per_second"}
    for by_size in results.values():
        assert set(by_size) == {"G1", "G5"}
        for size, row in by_size.items():
            assert row["group_size"] == int(size[1:]) and row["num_questions"] == 5
            assert {key for _, key, _ in engine_bench.COLUMNS} <= set(row)
            assert "answers" not in row
            # the untrained head is the identity: it answers as the base model does
            assert {k: v for k, v in results["untrained"][size].items() if k not in timing} == {
                k: v for k, v in results["base"][size].items() if k not in timing
            }


def test_heldout_generation_scores_every_control_with_the_bench_scores(tiny):
    passage = Passage("Cats sleep most of the day. Dogs bark.", tuple(
        Question(f"Question {i}?", ("Cats",)) for i in range(6)
    ))
    head = GroupHead(GroupHeadConfig(hidden_size=64, num_heads=4))
    results = heldout_generation(tiny, {"base": None, "untrained": head}, [passage, PASSAGES[0]],
                                 contexts=5, group_sizes=[1, 5], max_tokens=4)
    for by_size in results.values():
        assert set(by_size) == {"G1", "G5"}
        for size, row in by_size.items():
            # only the passage with five questions counts, and only its first five
            assert (row["group_size"], row["questions"]) == (int(size[1:]), 5)
            assert row["em"] == 0.0 and row["tag_rate"] == 0.0  # 4 tokens cannot close a tag
            assert 0.0 <= row["f1"] <= 1.0 and 5 <= row["completion_tokens"] <= 20
    # the untrained head is the identity: it answers as the base model does
    assert results["untrained"]["G5"]["f1"] == results["base"]["G5"]["f1"]


SHIPPED_DIR = Path(__file__).resolve().parent.parent / "model" / "head" / "checkpoints"


def test_shipped_checkpoints_are_small_and_describe_themselves():
    csa_dir = shipped_checkpoint("SmolLM2-135M-Instruct")
    assert csa_dir == SHIPPED_DIR / "smollm2-135m-instruct"
    control_dir = SHIPPED_DIR / "smollm2-135m-instruct-adapter-only"
    for directory, use_csa in ((csa_dir, True), (control_dir, False)):
        assert sum(f.stat().st_size for f in directory.iterdir()) <= 10_000_000
        config, meta = read_checkpoint_config(directory)
        assert config.use_csa is use_csa
        # the weights' names are the head's attribute names: the shipped files load strictly
        assert GroupHead.load(directory).config == config
        assert (config.base_model, config.hidden_size) == ("SmolLM2-135M-Instruct", 576)
        assert len(config.base_signature) == 128
        assert meta["trained"] and meta["settings"] and meta["train_args"]["train"]
        assert set(meta["metrics"]["bench"]) == {"base", "adapter-only", "csa+adapter"}
        assert meta["data"]["heldout_passages"] > 0


@pytest.mark.slow
def test_shipped_checkpoint_loads_on_the_embedded_model_and_keeps_g1_answers():
    from model.engine.grouped_engine import GroupedEngine, Member
    from model.engine.sampling import SamplingParams
    from model.weights.loading import load_model, weights_signature
    from server.prompts import encode_chat, extract_answer, question_messages

    loaded = load_model()
    signature = weights_signature(loaded.model)
    csa = GroupHead.load(
        shipped_checkpoint(loaded.name), loaded.name, signature, 576
    )
    control = GroupHead.load(
        SHIPPED_DIR / "smollm2-135m-instruct-adapter-only", loaded.name, signature, 576
    )
    passage = PASSAGES[1]
    prompts = [encode_chat(loaded.tokenizer, question_messages(passage.context, q.question))
               for q in passage.questions]

    def answers(module, groups):
        engine = GroupedEngine(loaded.model, loaded.tokenizer, module)
        members = [[Member(prompts[i], SamplingParams(max_tokens=24), tag=i) for i in g]
                   for g in groups]
        texts = {}
        for event in engine.generate(members):
            texts[event.member.tag] = texts.get(event.member.tag, "") + event.text
        return [texts[i] for i in range(len(prompts))]

    singles = [[i] for i in range(len(prompts))]
    # at G=1 CSA has no peer, and the CSA checkpoint carries the control's adapter unchanged
    assert answers(csa, singles) == answers(control, singles)
    grouped = answers(csa, [list(range(len(prompts)))])
    assert all(extract_answer(text) is not None for text in grouped)
