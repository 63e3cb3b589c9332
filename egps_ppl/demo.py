"""The built-in demo: an arithmetic word problem posed to a small chat model with two worked examples.

Without the examples SmolLM2-135M rarely uses the answer format; with them it answers in "Answer: N" form.
"""

from __future__ import annotations

from egps_ppl.errors import EGPSError
from egps_ppl.models.base import LanguageModel

INSTRUCTION = "Solve the problem. End your reply with 'Answer: N'."

WORKED_EXAMPLES = [
    (
        "Tom has 3 apples and buys 5 more. How many apples does he have now?",
        "Tom starts with 3 apples and buys 5 more, so he has 3 + 5 = 8 apples. Answer: 8",
    ),
    (
        "A box holds 12 pens. 4 pens are taken out. How many pens are left in the box?",
        "The box had 12 pens and 4 were taken out, so 12 - 4 = 8 pens are left. Answer: 8",
    ),
]

DEMO_QUESTION = "Sara has 7 marbles. Her friend gives her 6 more. How many marbles does Sara have now?"


def few_shot_messages(question: str) -> list[dict[str, str]]:
    """Chat messages: the worked examples as earlier turns, then ``question``."""
    messages: list[dict[str, str]] = []
    for problem, solution in WORKED_EXAMPLES:
        messages.append({"role": "user", "content": f"{INSTRUCTION}\n{problem}"})
        messages.append({"role": "assistant", "content": solution})
    messages.append({"role": "user", "content": f"{INSTRUCTION}\n{question}"})
    return messages


def encode_chat(lm: LanguageModel, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` through the model's chat template (ready for the assistant's reply)."""
    from egps_ppl.models.registry import chat_prompt

    if getattr(lm, "tokenizer", None) is None:
        raise EGPSError(f"model {lm.name!r} has no tokenizer, so it cannot take a chat prompt")
    return chat_prompt(lm, messages)
