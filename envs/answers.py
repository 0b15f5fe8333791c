"""Final answers: the last \\boxed{...} of a text, integer comparison (AIME), math-verify for
math, SQuAD's normalised exact match and F1 for text."""

from __future__ import annotations

import logging
import re
import string
import threading
from collections import Counter
from fractions import Fraction

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, nested braces handled;
    `\\boxed 42` without braces takes the next token. None if there is no complete one."""
    matches = list(_BOXED.finditer(text))
    for m in reversed(matches):
        start = m.end()
        if start < len(text) and text[start] == "{":
            depth = 0
            for i in range(start, len(text)):
                if text[i] == "{":
                    depth += 1
                elif text[i] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[start + 1 : i].strip()
            continue  # unbalanced: try an earlier one
        token = re.match(r"[^\s$]+", text[start:])
        if token:
            return token.group(0)
    return None


_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}")


def parse_integer(answer: str | int | None) -> int | None:
    """An answer as an integer: "042", "$42$", "42.0", "\\text{42}", "1,000" and "42^\\circ" all
    parse; "3/2", "x=4" and "" do not."""
    if answer is None:
        return None
    if isinstance(answer, int):
        return answer
    s = _WRAPPERS.sub(r"\1", str(answer))
    s = s.replace("$", "").replace("\\!", "").replace("\\,", "").replace(" ", "")
    s = re.sub(r"\^\{?\\circ\}?$", "", s)
    if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+", s):
        s = s.replace(",", "")
    if re.fullmatch(r"[+-]?\d+", s):
        return int(s)
    if re.fullmatch(r"[+-]?\d+\.0*", s):
        return int(Fraction(s))
    return None


_mv_log = logging.getLogger("math_verify")


def math_equal(prediction: str, gold: str) -> bool:
    """Symbolic equivalence by Hugging Face's math-verify (gold first, as it expects). Its signal
    based timeouts only work in the main thread; elsewhere they are off (a timeout of 0)."""
    from math_verify import parse, verify

    timeout = 5 if threading.current_thread() is threading.main_thread() else 0
    level = _mv_log.level
    _mv_log.setLevel(logging.ERROR)  # it warns on every call made without a timeout
    try:
        gold_p = parse(f"${gold}$", parsing_timeout=timeout)
        pred_p = parse(f"${prediction}$", parsing_timeout=timeout)
        return bool(gold_p and pred_p and verify(gold_p, pred_p, timeout_seconds=timeout))
    except Exception:  # noqa: BLE001 - an unparseable answer is a wrong answer
        return False
    finally:
        _mv_log.setLevel(level)


def normalize_text(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles (a, an, the), one
    space between words."""
    text = "".join(c for c in text.lower() if c not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


_PUNCTUATION = frozenset(string.punctuation)


def exact_match(prediction: str | None, gold: str) -> bool:
    """SQuAD's exact match: the two answers are equal once normalised (`normalize_text`)."""
    return prediction is not None and normalize_text(prediction) == normalize_text(gold)


def f1_score(prediction: str | None, gold: str) -> float:
    """SQuAD's F1: the harmonic mean of precision and recall of the normalised answers' words
    (1.0 when both are empty, 0.0 when one is)."""
    pred = normalize_text(prediction or "").split()
    ref = normalize_text(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if not common:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


ANSWER_KINDS = ("auto", "integer", "math", "text")


def answers_match(prediction: str | None, gold: str, kind: str = "auto") -> bool:
    """Whether `prediction` answers `gold`. kind: "integer" (compared as integers, as AIME is),
    "math" (math-verify), "text" (SQuAD's normalised exact match), or "auto" (integer when the
    gold answer is one, else math)."""
    if prediction is None:
        return False
    if kind not in ANSWER_KINDS:
        raise ValueError(f"answer kind must be one of {', '.join(ANSWER_KINDS)}, got {kind!r}")
    if kind == "text":
        return exact_match(prediction, gold)
    gold_int = parse_integer(gold)
    if kind == "integer" or (kind == "auto" and gold_int is not None):
        if gold_int is None:
            raise ValueError(f"gold answer {gold!r} is not an integer")
        return parse_integer(prediction) == gold_int
    return math_equal(prediction, gold)
