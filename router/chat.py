"""Chat input: what the router routes on and what the model is asked, for an OpenAI conversation.

The rule, documented in the README ("Serve it") and the same at training and serving time:

- **Routed on the last user turn.** The router's features are computed on the text of the last
  user message, exactly as training computed them on a query's text; a single string (the
  completions endpoint's ``prompt``, or ``Router.route(text)``) is a conversation of one user
  turn, so its features are identical either way. Earlier turns are not featurized: the
  training queries are single questions, and featurizing a transcript would move served inputs
  away from everything the model was trained on (and, with the embedding featurizers, toward the
  out-of-distribution fallback).
- **Earlier turns are context for the model**: the executed prompt renders the whole
  conversation with the model's template (``router.prompts.render_conversation``), the bundle's
  system prompt first and any client system message after it. A conversation of one user turn
  without a client system message renders exactly the prompt the labels were made with
  (``labelled_prompt`` in the proxy's answer and log says whether that was the case).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CONTEXT_ROLES = ("user", "assistant")
SYSTEM_ROLES = ("system", "developer")  # "developer" is the newer OpenAI name for system


@dataclass(frozen=True)
class Conversation:
    turns: tuple[tuple[str, str], ...]  # (role, text), ending with a user turn
    system: str = ""  # the client's system message(s), joined by blank lines

    @property
    def routing_text(self) -> str:
        """What the router featurizes: the last user turn."""
        return self.turns[-1][1]

    @property
    def labelled_prompt(self) -> bool:
        """True if the executed prompt is exactly the labels' (one user turn, no client system)."""
        return len(self.turns) == 1 and not self.system

    @classmethod
    def of_text(cls, text: str) -> "Conversation":
        return cls((("user", text),))


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"{where}.content[{j}]: only text parts are supported, got {kind!r}")
            parts.append(part["text"])
        return "\n".join(parts)
    raise ValueError(f"{where}.content must be a string or a list of text parts")


def parse_messages(messages: Any) -> Conversation:
    """An OpenAI ``messages`` list as a ``Conversation``; ``ValueError`` naming the bad message."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    turns, system = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ValueError(f"{where} must be an object with role and content")
        role = m.get("role")
        if role in SYSTEM_ROLES:
            system.append(_text(m.get("content"), where))
        elif role in CONTEXT_ROLES:
            if m.get("tool_calls") or m.get("function_call"):
                raise ValueError(f"{where}: tool calls are not supported")
            turns.append((role, _text(m.get("content"), where)))
        else:
            raise ValueError(f"{where}.role {role!r} is not supported; use one of "
                             f"{list(SYSTEM_ROLES + CONTEXT_ROLES)}")
    if not turns or turns[-1][0] != "user":
        raise ValueError("the last message (besides system messages) must be a user message: the question to answer")
    return Conversation(tuple(turns), "\n\n".join(s for s in system if s))
