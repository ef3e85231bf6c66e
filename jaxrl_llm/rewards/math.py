"""Verifiable math rewards: answer extraction, normalisation, equivalence, accuracy reward.

Extraction (``extract_answer``) looks, in this order, for
  1. the content of the last ``<answer>…</answer>`` tag (R1-style format), inside which
     a ``\\boxed{}`` is preferred, otherwise the whole tag content is the answer;
  2. the last ``\\boxed{…}`` / ``\\fbox{…}`` (nested braces handled);
  3. the text after the last ``####`` (GSM8K);
  4. the text after the last "answer is" / "answer:" (a leading number is taken if
     there is one, else the rest of the sentence);
  5. the last number (or simple LaTeX fraction) in the text.

Normalisation (``normalize_answer``) removes presentation only: ``$`` and math
delimiters, ``\\text{}`` wrappers, ``\\left``/``\\right``, LaTeX spacing, ``^\\circ``,
``%``, thousands separators, a leading ``x =``, spaces, a trailing period; rewrites
``\\dfrac``/``\\tfrac``/``\\frac{a}{b}``/``\\frac12`` as ``a/b``; and writes plain numbers
canonically (``3.0`` → ``3``, ``0.50`` → ``0.5``, ``+5`` → ``5``).

Equivalence (``math_equal``) is normalised-string equality, or else exact rational
equality when both sides are numbers (integers, decimals, ``a/b`` fractions), so
``1/2 == 0.5 == \\frac{1}{2}`` but ``0.333 != 1/3``. Symbolic equivalence (``2\\sqrt{2}``
vs ``\\sqrt{8}``) is out of scope.

References:
  Hendrycks et al. 2021, MATH dataset normalisation, https://arxiv.org/abs/2103.03874
  Cobbe et al. 2021, GSM8K ``####`` answers, https://arxiv.org/abs/2110.14168
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from fractions import Fraction

from jaxrl_llm.rewards._utils import column, completion_text

# A number: optional sign, digits with optional thousands separators, optional decimals,
# optional "/denominator"; or a bare ".5".
_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|[-+]?\.\d+"
_FRAC = r"-?\\[dt]?frac(?:\{[^{}]*\}\{[^{}]*\}|\d\d)"
_NUMBER_OR_FRAC_RE = re.compile(rf"{_FRAC}|(?<![\w.])(?:{_NUMBER})")
_LEADING_NUMBER_RE = re.compile(rf"\s*\$?\s*({_FRAC}|(?:{_NUMBER}))(?![\w/^])")
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|:)\s*:?", re.IGNORECASE)
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_PLAIN_NUMBER_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_FRACTION_RE = re.compile(r"(-?)\(?([-+]?(?:\d+(?:\.\d*)?|\.\d+))\)?/\(?([-+]?(?:\d+(?:\.\d*)?|\.\d+))\)?")


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """Content of the brace group opening at text[start] == "{", and the index after it."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{…}`` (or ``\\fbox{…}``, ``\\boxed 5``) in text.

    Nested braces are matched: ``\\boxed{\\frac{1}{2}}`` → ``\\frac{1}{2}``. Returns None
    when there is no box or its braces are unbalanced.
    """
    starts = [m for m in re.finditer(r"\\(?:boxed|fbox)", text)]
    for m in reversed(starts):
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            got = _braced(text, i)
            if got is not None:
                return got[0].strip()
        elif i > m.end():  # "\boxed 5": up to the next space or "$"
            token = re.match(r"[^\s$]+", text[i:])
            if token:
                return token.group(0)
    return None


def extract_tag(text: str, tag: str = "answer") -> str | None:
    """Content of the last ``<tag>…</tag>`` in text (stripped), or None."""
    matches = re.findall(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", text, re.DOTALL)
    return matches[-1].strip() if matches else None


def _after_answer_is(text: str) -> str | None:
    matches = list(_ANSWER_IS_RE.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end() :]
    boxed = extract_boxed(rest)
    if boxed is not None:
        return boxed
    number = _LEADING_NUMBER_RE.match(rest)
    if number:
        return number.group(1)
    sentence = re.split(r"\n|\.(?:\s|$)", rest.strip(), maxsplit=1)[0].strip()
    return sentence or None


def extract_answer(text: str) -> str | None:
    """The final answer written in a solution, or None (see the module docstring order).

    Examples: "so \\boxed{\\frac{1}{2}}." → "\\frac{1}{2}"; "… #### 1,234" → "1,234";
    "The answer is 42 apples." → "42"; "5 + 7 = 12" → "12".
    """
    if not isinstance(text, str):
        return None
    tagged = extract_tag(text, "answer")
    if tagged is not None:
        boxed = extract_boxed(tagged)
        return boxed if boxed is not None else (tagged or None)
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    if "####" in text:
        after = text.rsplit("####", 1)[1].strip()
        line = after.split("\n", 1)[0].strip()
        if line:
            return line
    answer = _after_answer_is(text)
    if answer is not None:
        return answer
    numbers = _NUMBER_OR_FRAC_RE.findall(text)
    return numbers[-1] if numbers else None


def _replace_fracs(s: str) -> str:
    """\\frac{a}{b} → a/b (parenthesised when not atomic), \\frac12 → 1/2."""
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\1/\2", s)
    out, i = [], 0
    while True:
        j = s.find("\\frac", i)
        if j < 0:
            out.append(s[i:])
            return "".join(out)
        out.append(s[i:j])
        k = j + len("\\frac")
        num = _braced(s, k) if k < len(s) and s[k] == "{" else None
        den = _braced(s, num[1]) if num and num[1] < len(s) and s[num[1]] == "{" else None
        if num is None or den is None:
            out.append("\\frac")
            i = k
            continue
        parts = []
        for part in (_replace_fracs(num[0]), _replace_fracs(den[0])):
            part = part.strip()
            parts.append(part if re.fullmatch(r"[-+]?[\w.]+", part) else f"({part})")
        out.append(f"{parts[0]}/{parts[1]}")
        i = den[1]


def _canonical_number(s: str) -> str:
    """'3.0' → '3', '0.50' → '0.5', '+5' → '5', '-0' → '0'; other strings unchanged."""
    if not _PLAIN_NUMBER_RE.fullmatch(s):
        return s
    value = Fraction(s)
    if value.denominator == 1:
        return str(value.numerator)
    text = s.lstrip("+")
    if "." in text:
        text = text.rstrip("0")
        text = re.sub(r"^(-?)\.", r"\g<1>0.", text)
    return text


def normalize_answer(answer: str | None) -> str:
    """Canonical string form of an answer (presentation removed); "" for None/empty.

    Examples: "$1,000$" → "1000"; "\\dfrac{3}{4}" → "3/4"; "x = 2.50" → "2.5";
    "\\text{(B)}" → "(B)"; "90^\\circ" → "90"; "\\left( 1, 2 \\right)" → "(1,2)".
    """
    if answer is None:
        return ""
    s = str(answer).strip()
    boxed = extract_boxed(s)
    if boxed is not None and re.fullmatch(r"\$?\s*\\(?:boxed|fbox)\s*\{.*\}\s*\$?\.?", s, re.DOTALL):
        s = boxed
    s = re.sub(r"^\\\(|\\\)$|^\\\[|\\\]$", "", s).replace("\\$", "").replace("$", "")
    for _ in range(3):  # unwrap nested \text{...}
        s = re.sub(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\left|\\right|\\displaystyle", "", s)
    s = re.sub(r"\\[!,;:]|\\ |~", "", s)
    s = re.sub(r"\^\s*\{?\\circ\}?|°", "", s)
    s = s.replace("\\%", "").replace("%", "")
    s = _replace_fracs(s)
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"(?<![\d.,])(\d{1,3}(?:,\d{3})+)(?![\d,])", lambda m: m.group(1).replace(",", ""), s)
    s = s.rstrip(".")
    s = re.sub(r"^[a-zA-Z]=(?!=)", "", s)  # "x=5" → "5"
    if re.fullmatch(r"\{[^{}]*\}", s):
        s = s[1:-1]
    return _canonical_number(s)


def _to_number(s: str) -> Fraction | None:
    """Exact value of a normalised plain number or fraction, else None."""
    if _PLAIN_NUMBER_RE.fullmatch(s):
        return Fraction(s)
    m = _FRACTION_RE.fullmatch(s)
    if m:
        sign, num, den = m.groups()
        den_value = Fraction(den)
        if den_value == 0:
            return None
        value = Fraction(num) / den_value
        return -value if sign else value
    return None


def math_equal(pred: str | None, gold: str | None) -> bool:
    """True when pred and gold are the same answer after normalisation.

    Equal normalised strings, or both exact numbers with the same rational value
    (``"0.5"``, ``"1/2"``, ``"\\frac{1}{2}"``, ``"$0.50$"`` are all equal). None or an
    empty answer never equals anything.
    """
    a, b = normalize_answer(pred), normalize_answer(gold)
    if not a or not b:
        return False
    if a == b:
        return True
    va, vb = _to_number(a), _to_number(b)
    return va is not None and vb is not None and va == vb


def gold_answer(gold: str | None) -> str | None:
    """The answer inside a gold column entry, or None if missing/unparseable.

    A bare answer ("42", "\\frac{1}{2}") is used as is; a worked solution with ``####``,
    ``\\boxed{}`` or an ``<answer>`` tag is reduced to its final answer.
    """
    if gold is None:
        return None
    if isinstance(gold, (int, float)) and not isinstance(gold, bool):
        gold = repr(gold) if isinstance(gold, float) else str(gold)
    if not isinstance(gold, str):
        return None
    if "####" in gold or "\\boxed" in gold or "\\fbox" in gold or "<answer>" in gold:
        gold = extract_answer(gold)
    return gold if normalize_answer(gold) else None


def math_accuracy_reward(
    prompts: Sequence[str],
    completions: Sequence,
    answer: Sequence[str | None] | None = None,
    **columns,
) -> list[float | None]:
    """1.0 if the completion's extracted answer equals the gold ``answer``, else 0.0.

    TRL reward-function convention. A completion with no extractable answer scores 0.0;
    a sample whose gold answer is missing (None, "") or unparseable scores None.

    Args:
      prompts: N prompts (unused).
      completions: N completions (str or conversational message lists).
      answer: dataset column with N gold answers (bare answers or GSM8K/MATH solutions);
        without it, the ``solution`` column is read (TRL's and open-r1's name).

    Returns:
      N floats in {0.0, 1.0} or None.
    """
    del prompts
    if answer is None and columns.get("solution") is not None:
        answer = columns["solution"]
    answer = column("answer", answer, len(completions))
    rewards: list[float | None] = []
    for completion, gold in zip(completions, answer):
        gold = gold_answer(gold)
        if gold is None:
            rewards.append(None)
            continue
        pred = extract_answer(completion_text(completion))
        rewards.append(1.0 if math_equal(pred, gold) else 0.0)
    return rewards
