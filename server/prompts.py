"""The serving prompt: chat messages for one question about a passage, and the answer format.

The system prompt is the answer-in-tags prompt of the research protocol, so answers can be
scored exactly as there (the answer is the first <answer>...</answer> span).
"""

from __future__ import annotations

import re
import threading
import weakref
from dataclasses import dataclass

ANSWER_SYSTEM_PROMPT = (
    "You are a helpful assistant. Answer the question based on the given passage.\n"
    "You MUST wrap your answer in <answer></answer> tags. Be concise.\n\n"
    "Example:\nQuestion: What color is the sky?\n<answer>blue</answer>"
)
ANSWER_PATTERN = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def question_messages(context: str, question: str, system_prompt: str | None = None) -> list[dict]:
    """System prompt and passage come first so every question about a passage shares them
    as a token prefix; only the question differs. `system_prompt` None: the answer-in-tags
    prompt; "": no system message at all."""
    user = {"role": "user", "content": f"Passage:\n{context}\n\nQuestion: {question}"}
    if system_prompt == "":
        return [user]
    return [{"role": "system", "content": system_prompt or ANSWER_SYSTEM_PROMPT}, user]


def extract_answer(text: str) -> str | None:
    """The text of the first <answer>...</answer> span, stripped; None without tags."""
    match = ANSWER_PATTERN.search(text)
    return match.group(1).strip() if match else None


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` rendered with the model's chat template, ready for the reply.

    Content is text: a special-token string inside a message ("<|im_end|>\n<|im_start|>system")
    is tokenized as the plain characters it is, so a client cannot forge a turn of another
    role. The template is rendered around placeholders; its own text is tokenized with special
    tokens, each message's content without (for templates that rewrite content, which leave no
    placeholder, the rendered text is tokenized whole)."""
    with _TOKENIZER_LOCK:  # transformers flips split_special_tokens on the tokenizer object
        pieces = _chat_pieces(tokenizer, messages)
        if pieces is None:
            plain = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=False)
            return list(tokenizer(plain, add_special_tokens=False)["input_ids"])
        return _tokenize(tokenizer, pieces)


@dataclass(frozen=True)
class QuestionPrompts:
    """The prompts of one passage's questions, and the length of that prompt with an empty
    question: what the passage and the system prompt leave of the context."""

    prompts: list[list[int]]
    bare_length: int


class PromptEncoder:
    """A model's tokenizer as the server uses it. `questions` tokenizes a passage once for all
    its questions: their prompts differ only after "Question:", so each prompt is the shared
    head's ids then its own question's, exactly the ids `encode_chat` gives the whole prompt.
    That holds where the tokenizer ends a piece of text at ": " (byte-level BPE, as GPT-2,
    Llama 3, Qwen and SmolLM2 split text), which is checked once, on probes; a tokenizer that
    fails the check gets every prompt tokenized whole."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.max_token_chars = longest_token_chars(tokenizer)
        if tokenizer not in _SPLITS_AFTER_QUESTION:  # a tokenizer is checked once
            _SPLITS_AFTER_QUESTION[tokenizer] = all(
                (spliced := self._spliced(context, [question], None)) is not None
                and spliced.prompts == [encode_chat(tokenizer,
                                                    question_messages(context, question))]
                for context, question in _PROBES)
        self.splits_after_question = _SPLITS_AFTER_QUESTION[tokenizer]

    def chat(self, messages: list[dict]) -> list[int]:
        return encode_chat(self.tokenizer, messages)

    def questions(self, context: str, questions: list[str],
                  system_prompt: str | None) -> QuestionPrompts:
        spliced = (self._spliced(context, questions, system_prompt)
                   if self.splits_after_question else None)
        if spliced is not None:
            return spliced
        prompts = [self.chat(question_messages(context, q, system_prompt))
                   for q in ["", *questions]]
        return QuestionPrompts(prompts[1:], len(prompts[0]))

    def _spliced(self, context: str, questions: list[str],
                 system_prompt: str | None) -> QuestionPrompts | None:
        """None for a template that rewrites content: it leaves no head to share."""
        messages = question_messages(context, "", system_prompt)
        with _TOKENIZER_LOCK:
            pieces = _chat_pieces(self.tokenizer, messages)
            if pieces is None:
                return None
            at = max(i for i, (_, is_content) in enumerate(pieces) if is_content)
            question_line = pieces[at][0]  # the user message: passage, then "Question: "
            assert question_line.endswith("Question: ")
            head = _tokenize(self.tokenizer, [*pieces[:at], (question_line[:-1], True)])
            rest = _tokenize(self.tokenizer, pieces[at + 1 :])
            tails = [_tokenize(self.tokenizer, [(" " + q, True)]) for q in ["", *questions]]
        return QuestionPrompts([head + tail + rest for tail in tails[1:]],
                               len(head) + len(tails[0]) + len(rest))


_TOKENIZER_LOCK = threading.Lock()
_SPLITS_AFTER_QUESTION: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PLACEHOLDER = re.compile("\x00(\\d+)\x00")
# passages ending, and questions starting, in each kind of character
_PROBES = [(context, question)
           for context in ("A passage.", "words", "in 1999", "spaced  ", "lines\n", "café",
                           "<|im_end|>")
           for question in ("Who?", " spaced", "\nlines", "42 times", "", "?!", "Über")]


def _chat_pieces(tokenizer, messages: list[dict]) -> list[tuple[str, bool]] | None:
    """The rendered chat as (text, is_content) pieces, or None for a template that rewrites
    content (it leaves no placeholder to split at). Call under _TOKENIZER_LOCK."""
    marked = [{**message, "content": f"\x00{index}\x00"} for index, message in
              enumerate(messages)]
    text = tokenizer.apply_chat_template(marked, add_generation_prompt=True, tokenize=False)
    pieces = _PLACEHOLDER.split(text)
    if len(pieces) != 2 * len(messages) + 1:
        return None
    return [(messages[int(piece)]["content"], True) if position % 2 else (piece, False)
            for position, piece in enumerate(pieces)]


def _tokenize(tokenizer, pieces: list[tuple[str, bool]]) -> list[int]:
    """Template text with its special tokens; content as the plain characters it is."""
    ids: list[int] = []
    for text, is_content in pieces:
        if is_content:
            ids += tokenizer(text, add_special_tokens=False,
                             split_special_tokens=True)["input_ids"]
        elif text:
            ids += tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def longest_token_chars(tokenizer) -> int:
    """The most characters one token stands for (its vocabulary string is at least as long as
    its decoded text): a text of n characters has at least n / this many tokens."""
    return max(len(token) for token in tokenizer.get_vocab())
