"""Chat input: routed on the last user turn; a one-turn conversation renders exactly the rollout's
prompt in every template; earlier turns and client system messages are context."""

from __future__ import annotations

import pytest

from router.chat import Conversation, parse_messages
from router.execution import ModelExecution
from router.prompts import TEMPLATES, render_conversation, render_prompt


def test_routing_text_is_the_last_user_turn():
    c = parse_messages([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello."},
                        {"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": "2+2?"}]}])
    assert c.routing_text == "What is\n2+2?" and c.system == "Be brief."
    assert c.turns == (("user", "Hi"), ("assistant", "Hello."), ("user", "What is\n2+2?"))
    assert not c.labelled_prompt
    one = parse_messages([{"role": "user", "content": "What is 2+2?"}])
    assert one == Conversation.of_text("What is 2+2?") and one.labelled_prompt


@pytest.mark.parametrize("messages,fragment", [
    ([], "non-empty"),
    ([{"role": "assistant", "content": "x"}], "last message"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "last message"),
    ([{"role": "tool", "content": "x"}], "role"),
    ([{"role": "user", "content": None}], "content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "text parts"),
    ([{"role": "assistant", "content": "x", "tool_calls": [{}]}, {"role": "user", "content": "y"}], "tool calls"),
    (["hi"], "object"),
])
def test_bad_messages_are_refused_with_the_reason(messages, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_messages(messages)


@pytest.mark.parametrize("template", TEMPLATES)
def test_one_turn_renders_exactly_the_rollout_prompt(template):
    """Trained and served alike: what the labels were made on is what a one-turn request runs on."""
    assert render_conversation(template, "SYS", [("user", "Q?")]) == render_prompt(template, "SYS", "Q?")
    ex = ModelExecution(template=template, system_prompt="SYS")
    assert ex.prompt("Q?") == ex.prompt([("user", "Q?")]) == render_prompt(template, "SYS", "Q?")


def test_earlier_turns_in_each_template():
    turns = [("user", "A?"), ("assistant", "a."), ("user", "B?")]
    few = render_conversation("fewshot", "SYS", turns)
    assert few.endswith("Question: A?\nAnswer: a.\n\nQuestion: B?\nAnswer:")
    assert render_conversation("raw", "SYS", turns) == "A?\n\na.\n\nB?"
    chat = render_conversation("chatml", "SYS", turns)
    assert chat.count("<|im_start|>") == 5 and chat.endswith("<|im_start|>user\nB?<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="end with a user turn"):
        render_conversation("chatml", "SYS", turns[:2])
    with pytest.raises(ValueError, match="unknown prompt template"):
        render_prompt("jinja", "SYS", "Q?")
