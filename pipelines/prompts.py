"""Prompt templates: how a question becomes the text a model continues.

The rendered prompt ends exactly where the model's answer starts, so the one-pass method can
append a truncated completion and the answer-forcing suffix to it.
"""

from __future__ import annotations

TEMPLATES = ("chatml", "fewshot", "raw")

# Few-shot examples for pretrained (non-chat) models such as Gemma 3 270M: they show the
# reasoning format and the exact answer phrase the forcing suffix relies on.
FEWSHOT = (
    ("What is 12 + 7?", "12 + 7 = 19.\nThe final answer is 19."),
    ("Tom has 3 bags with 4 apples each. How many apples does he have?",
     "3 bags times 4 apples is 3 * 4 = 12.\nThe final answer is 12."),
)


def render_prompt(template: str, system: str, question: str) -> str:
    """Render ``question`` for a model that uses ``template``."""
    if template == "chatml":
        # SmolLM2-Instruct's template (the GGUF's own), written out so no Jinja runs here
        return (
            f"<|im_start|>system\n{system}<|im_end|>\n"
            f"<|im_start|>user\n{question}<|im_end|>\n"
            f"<|im_start|>assistant\n"
        )
    if template == "fewshot":
        shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in FEWSHOT)
        return f"{system}\n\n{shots}Question: {question}\nAnswer:"
    if template == "raw":
        return question
    raise ValueError(f"unknown prompt template {template!r}; choose one of {list(TEMPLATES)}")


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
