"""Prompt templates: how a question (or a conversation) becomes the text a model continues.

The rendered prompt ends exactly where the model's answer starts, so the one-pass method can
append a truncated completion and the answer-forcing suffix to it. The rollout renders every
query with ``render_prompt``; the proxy renders a conversation with ``render_conversation``,
which gives the very same text for a conversation of one user turn (tested), so a served
single-turn request is executed on the prompt its labels were made with.

Here in the runtime package because the proxy executes decisions with them; the pipeline
imports them from here (``router`` never imports ``pipelines``).
"""

from __future__ import annotations

from typing import Sequence

TEMPLATES = ("chatml", "fewshot", "raw")

# Few-shot examples for pretrained (non-chat) models such as Gemma 3 270M: they show the
# reasoning format and the exact answer phrase the forcing suffix relies on.
FEWSHOT = (
    ("What is 12 + 7?", "12 + 7 = 19.\nThe final answer is 19."),
    ("Tom has 3 bags with 4 apples each. How many apples does he have?",
     "3 bags times 4 apples is 3 * 4 = 12.\nThe final answer is 12."),
)


def check_template(template: str) -> str:
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; choose one of {list(TEMPLATES)}")
    return template


def render_prompt(template: str, system: str, question: str) -> str:
    """Render ``question`` for a model that uses ``template``."""
    return render_conversation(template, system, [("user", question)])


def render_conversation(template: str, system: str, turns: Sequence[tuple[str, str]]) -> str:
    """Render a conversation: ``turns`` are ``(role, text)`` with role "user" or "assistant",
    the last one a user turn (the question the model answers now). Earlier turns are context,
    written the way the template writes a turn."""
    check_template(template)
    if not turns or turns[-1][0] != "user":
        raise ValueError("a conversation must end with a user turn")
    *context, (_, question) = turns
    if template == "chatml":
        # SmolLM2-Instruct's template (the GGUF's own), written out so no Jinja runs here
        body = "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in turns)
        return f"<|im_start|>system\n{system}<|im_end|>\n{body}<|im_start|>assistant\n"
    if template == "fewshot":
        shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in FEWSHOT)
        past = "".join(f"Question: {text}\n" if role == "user" else f"Answer: {text}\n\n" for role, text in context)
        return f"{system}\n\n{shots}{past}Question: {question}\nAnswer:"
    # raw: the texts as they are, earlier turns first
    return "\n\n".join([text for _, text in context] + [question])


def direct_prefix(template: str, prefix: str) -> str:
    """What budget 0 appends straight after the rendered prompt to force a direct answer.

    A few-shot prompt ends with "Answer:" and its examples continue with a space ("Answer: 12 +
    7 = 19."), so the direct prefix gets that space too: without it the model sees
    "Answer:The final answer is", a token sequence its examples never showed (measured on Gemma 3
    270M: direct accuracy 0.065 on the default study's tasks).
    """
    if template == "fewshot" and prefix and not prefix[0].isspace():
        return " " + prefix
    return prefix


def stop_strings(template: str) -> tuple[str, ...]:
    """Strings that end a completion in this template (besides the model's EOS)."""
    if template == "chatml":
        return ("<|im_end|>", "<|im_start|>")
    if template == "fewshot":
        # a pretrained model happily writes the next "Question:" itself
        return ("\nQuestion:", "\n\n\n")
    return ()


def completion_stops(template: str, extra: Sequence[str] = ()) -> tuple[str, ...]:
    """Stop strings of a reasoning completion: the template's, then ``extra``, each once."""
    return tuple(dict.fromkeys(s for s in (*stop_strings(template), *extra) if s))


def answer_stops(template: str) -> tuple[str, ...]:
    """Stop strings of a forced answer: the answer is one line."""
    return tuple(dict.fromkeys(("\n", *(s for s in stop_strings(template) if s))))
