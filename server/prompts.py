"""The serving prompt: chat messages for one question about a passage, and the answer format.

The system prompt is the answer-in-tags prompt of the research protocol, so answers can be
scored exactly as there (the answer is the first <answer>...</answer> span).
"""

from __future__ import annotations

import re
import threading

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
        return _encode_chat(tokenizer, messages)


def _encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    marked = [{**message, "content": f"\x00{index}\x00"} for index, message in
              enumerate(messages)]
    text = tokenizer.apply_chat_template(marked, add_generation_prompt=True, tokenize=False)
    pieces = _PLACEHOLDER.split(text)
    if len(pieces) != 2 * len(messages) + 1:
        plain = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                              tokenize=False)
        return list(tokenizer(plain, add_special_tokens=False)["input_ids"])
    ids: list[int] = []
    for position, piece in enumerate(pieces):
        if position % 2:  # a placeholder's captured index
            content = messages[int(piece)]["content"]
            ids += tokenizer(content, add_special_tokens=False,
                             split_special_tokens=True)["input_ids"]
        elif piece:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids


_TOKENIZER_LOCK = threading.Lock()
_PLACEHOLDER = re.compile("\x00(\\d+)\x00")


def longest_token_chars(tokenizer) -> int:
    """The most characters one token stands for (its vocabulary string is at least as long as
    its decoded text): a text of n characters has at least n / this many tokens."""
    return max(len(token) for token in tokenizer.get_vocab())
