"""The serving prompt's token ids (server/prompts.py): a grouped request's passage is tokenized
once for all its questions, and every question's prompt is still exactly the ids the whole
prompt gets, as a chat request with the same messages gets them."""

from __future__ import annotations

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from model.weights.tiny import CHAT_TEMPLATE, SPECIAL_TOKENS, build_tiny_tokenizer
from server.prompts import PromptEncoder, encode_chat, extract_answer, question_messages

TOKENIZER = build_tiny_tokenizer()
ENCODER = PromptEncoder(TOKENIZER)
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)


def whole(tokenizer, context: str, question: str, system_prompt: str | None) -> list[int]:
    return encode_chat(tokenizer, question_messages(context, question, system_prompt))


@seed(26)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(context=TEXT, questions=st.lists(TEXT, min_size=1, max_size=3),
       system_prompt=st.sampled_from([None, "", "Answer briefly."]))
def test_each_prompt_is_the_whole_prompts_ids(context, questions, system_prompt):
    prompts = ENCODER.questions(context, questions, system_prompt)
    assert prompts.prompts == [whole(TOKENIZER, context, q, system_prompt) for q in questions]
    assert prompts.bare_length == len(whole(TOKENIZER, context, "", system_prompt))


class CountingTokenizer:
    """The tiny tokenizer, recording every text it is asked to tokenize."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.texts: list[str] = []

    def __call__(self, text, **kwargs):
        self.texts.append(text)
        return self._tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def test_the_passage_is_tokenized_once_for_all_its_questions():
    counting = CountingTokenizer(TOKENIZER)
    encoder = PromptEncoder(counting)
    assert encoder.splits_after_question
    counting.texts.clear()
    passage = "The Amazon basin spans nine nations of South America."
    encoder.questions(passage, ["Which continent?", "How many nations?", "Why?"], None)
    assert sum(passage in text for text in counting.texts) == 1


def merging_tokenizer() -> PreTrainedTokenizerFast:
    """Bytes, plus one token for ": " that a split after "Question:" would never form."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + alphabet + [":Ġ"])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[(":", "Ġ")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def test_a_tokenizer_that_merges_across_the_split_gets_whole_prompts():
    tokenizer = merging_tokenizer()
    encoder = PromptEncoder(tokenizer)
    assert not encoder.splits_after_question
    questions = ["Who?", "Where: here?"]
    prompts = encoder.questions("A passage.", questions, None)
    assert prompts.prompts == [whole(tokenizer, "A passage.", q, None) for q in questions]
    assert prompts.bare_length == len(whole(tokenizer, "A passage.", "", None))


def test_the_answer_is_the_first_tagged_span():
    assert extract_answer("<answer> South America </answer> <answer>no</answer>") == (
        "South America")
    assert extract_answer("South America") is None
