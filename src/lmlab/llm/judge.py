"""An optional LLM judge with a structured verdict.

The judge sees the question, the reference answer and the subject's final answer text,
never its reasoning. It must answer with a JSON object ``{"verdict": "correct" |
"incorrect"}``; anything else is recorded as off-format, not guessed at.
"""

from __future__ import annotations

import json
import re

from lmlab.llm.clients import Request

JUDGE_MAX_TOKENS = 64
_PROMPT = """You grade answers. Compare the model's answer with the reference answer.
{rule}
Question: {question}
Reference answer: {reference}
Model answer: {answer}

Reply with only a JSON object: {{"verdict": "correct"}} or {{"verdict": "incorrect"}}."""
_RULE = "The answer is correct when it states the same fact as the reference, in any wording."
_ABSTAIN_RULE = ("The question cannot be answered from the context. The answer is correct only "
                 "when it says so (that the information is not available or unknown).")
_OBJECT = re.compile(r"\{[^{}]*\}")


def judge_request(key: str, question: str, reference: str, answer: str,
                  abstention: bool = False) -> Request:
    prompt = _PROMPT.format(rule=_ABSTAIN_RULE if abstention else _RULE, question=question,
                            reference=reference, answer=answer.strip() or "(empty)")
    return Request(key=key, user=prompt, max_tokens=JUDGE_MAX_TOKENS)


def parse_verdict(text: str) -> bool | None:
    """True/False for a well-formed verdict, None when the judge answered off-format."""
    for match in _OBJECT.finditer(text or ""):
        try:
            verdict = json.loads(match.group(0)).get("verdict")
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(verdict, str) and verdict.strip().lower() in ("correct", "incorrect"):
            return verdict.strip().lower() == "correct"
    return None
