"""Problem sources: data sets through Hugging Face `datasets` (hub ids or local files), and
procedurally generated arithmetic that needs no network.

A problem source is a sequence of `Problem`s: `len(source)` and `source[i]`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

from toolgrpo.envs.answers import last_boxed, parse_integer
from toolgrpo.hub import HubUnavailableError


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    answer: str
    """The reference answer, as text (an integer for AIME and Arith)."""
    answer_kind: str = "auto"
    """"integer", "math" (math-verify), "text" (SQuAD's exact match) or "auto"; see
    toolgrpo.envs.answers.answers_match."""
    meta: dict = field(default_factory=dict, compare=False)
    source: str = ""
    """The problem source it came from (a mixture's: toolgrpo.envs.mixture)."""
    expected_tools: tuple[str, ...] = ()
    """The tools its source expects a solution to call first (empty: any)."""


AIME_SOURCES = {
    "train": ("gneubig/aime-1983-2024",),
    "test": ("opencompass/AIME2025:AIME2025-I", "opencompass/AIME2025:AIME2025-II"),
}
"""The original project's training collection (AIME 1983-2024) and AIME 2025 for evaluation.
A hub id may name a configuration after a colon."""

QUESTION_COLUMNS = ("problem", "question", "Question", "Problem", "prompt")
ANSWER_COLUMNS = ("answer", "Answer", "final_answer", "solution", "Solution")
ID_COLUMNS = ("id", "ID", "problem_id", "unique_id")
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _load_table(source: str, split: str):
    """Rows of one source as a `datasets.Dataset`."""
    import datasets

    ext = os.path.splitext(source)[1].lower()
    if ext in LOCAL_FORMATS or os.path.exists(source):
        if not os.path.exists(source):
            raise FileNotFoundError(f"problem file {source!r} does not exist")
        if ext not in LOCAL_FORMATS:
            raise ValueError(f"problem file {source!r}: use one of {', '.join(LOCAL_FORMATS)}")
        _check_local_file(source, ext)
        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # a local file's "Generating train split" is noise
        try:
            return datasets.load_dataset(LOCAL_FORMATS[ext], data_files=source, split="train")
        except Exception as exc:
            cause = exc.__cause__ or exc
            text = f"{type(cause).__name__}: {cause}".splitlines()[0][:200]
            raise ValueError(f"problem file {source!r} could not be read ({text})") from exc
        finally:
            if bars:
                datasets.enable_progress_bars()
    name, _, config = source.partition(":")
    unreachable = False
    try:
        with _offline_unless_reachable() as unreachable:
            loaded = datasets.load_dataset(name, config or None)
    except Exception as exc:
        text = (
            "the Hub cannot be reached and it is not in the local cache"
            if unreachable
            else f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        )
        raise HubUnavailableError(
            f"could not load {source!r} from the Hugging Face Hub ({text})",
            "Offline, pass a local JSON/JSONL/CSV/Parquet file instead, e.g. "
            "gym.make('ToolMath-AIME-v0', problems='aime.jsonl') with one "
            '{"problem": ..., "answer": ...} per line.',
        ) from exc
    if split in loaded:
        return loaded[split]
    if len(loaded) == 1:  # e.g. AIME 2025 ships only a "test" split; take what there is
        return next(iter(loaded.values()))
    raise ValueError(
        f"{source!r} has no split {split!r}; it has {', '.join(str(s) for s in loaded)}"
    )


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub's endpoint opens within `timeout_s` (always True when
    a proxy is configured: the proxy decides)."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
        return True
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _offline_unless_reachable():
    """`datasets` retries an unreachable Hub for about 30 s before it fails; when the endpoint
    plainly cannot be reached, load in offline mode instead (the local cache answers at once)."""
    import datasets.config
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or hub_reachable():
        yield False
        return
    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield True
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _check_local_file(source: str, ext: str) -> None:
    """Errors that datasets reports without the file's name or line: an empty file, a JSON
    Lines row that is not a JSON object."""
    if os.path.getsize(source) == 0:
        raise ValueError(f"problem file {source!r} is empty")
    if ext != ".jsonl":
        return
    with open(source, encoding="utf-8") as f:
        rows = 0
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"problem file {source!r} line {number} is not JSON "
                    f"({exc.msg} at column {exc.colno}): {line.strip()[:80]!r}"
                ) from None
            if not isinstance(row, dict):  # a bad line of the file: a ValueError like the others
                raise ValueError(  # noqa: TRY004
                    f"problem file {source!r} line {number} is not a JSON object "
                    f"with question and answer fields: {line.strip()[:80]!r}"
                )
            rows += 1
    if not rows:
        raise ValueError(f"problem file {source!r} has no rows")


def _pick(columns: Sequence[str], candidates: Sequence[str], what: str, source: str) -> str:
    for c in candidates:
        if c in columns:
            return c
    raise ValueError(
        f"{source!r} has no {what} column: looked for {', '.join(candidates)}; "
        f"found {', '.join(columns)}"
    )


def load_problems(
    sources: str | Sequence[str], split: str = "train", answer_kind: str = "auto"
) -> list[Problem]:
    """Problems from hub ids or local files (several are concatenated). Question and answer
    columns are detected; an answer column holding worked solutions contributes their \\boxed{}
    answer. A row without a usable answer is an error that names the row."""
    if sources == "aime":
        if split not in AIME_SOURCES:
            raise ValueError(f"AIME has splits {', '.join(AIME_SOURCES)}, not {split!r}")
        sources = AIME_SOURCES[split]
    elif isinstance(sources, str):
        sources = (sources,)
    problems: list[Problem] = []
    for source in sources:
        table = _load_table(source, split)
        columns = table.column_names
        q_col = _pick(columns, QUESTION_COLUMNS, "question", source)
        a_col = _pick(columns, ANSWER_COLUMNS, "answer", source)
        id_col = next((c for c in ID_COLUMNS if c in columns), None)
        for i, row in enumerate(table):
            raw = row[a_col]
            answer = None if raw is None else str(raw).strip()
            if answer and a_col.lower() == "solution":
                answer = last_boxed(answer)
            if not answer:
                raise ValueError(
                    f"{source!r} row {i} (id {row.get(id_col, i)!r}) has no usable "
                    f"answer in column {a_col!r}: {str(raw)[:80]!r}"
                )
            question = str(row[q_col] or "").strip()
            if not question:
                raise ValueError(f"{source!r} row {i} has an empty {q_col!r}")
            pid = f"{source}#{row[id_col] if id_col else i}"
            kind = answer_kind
            if kind == "integer" and parse_integer(answer) is None:
                raise ValueError(f"{source!r} row {i}: answer {answer!r} is not an integer")
            problems.append(Problem(pid, question, answer, kind))
    if not problems:
        raise ValueError(f"no problems in {list(sources)!r}")
    return problems


class ArithProblems(Sequence[Problem]):
    """Procedurally generated problems that need exact computation, with integer answers.

    Problem `i` is a pure function of (seed, difficulty, i): unlimited and reproducible. Kinds:
    products of large numbers, modular powers, digit sums of factorials, counting with
    conditions, gcd/lcm, sums of sequences. `difficulty` (1-10) scales the numbers.
    """

    KINDS = ("product", "modpow", "factorial_digits", "count", "gcd_lcm", "series")
    SIZE = 2**31

    def __init__(self, difficulty: int = 3, seed: int = 0, kinds: Sequence[str] | None = None):
        if not 1 <= difficulty <= 10:
            raise ValueError(f"difficulty must be in 1..10, got {difficulty}")
        kinds = tuple(kinds or self.KINDS)
        unknown = set(kinds) - set(self.KINDS)
        if unknown:
            raise ValueError(f"unknown arithmetic kinds {sorted(unknown)}; known: {self.KINDS}")
        self.difficulty, self.seed, self.kinds = difficulty, seed, kinds

    def __len__(self) -> int:
        return self.SIZE

    # integers only, deliberately: a slice of 2**31 generated problems is not made
    def __getitem__(self, index: int) -> Problem:  # ty: ignore[incompatible-method-override]
        if not 0 <= index < self.SIZE:
            raise IndexError(index)
        rng = random.Random(f"{self.seed}:{self.difficulty}:{index}")
        kind = rng.choice(self.kinds)
        question, answer = getattr(self, f"_{kind}")(rng, self.difficulty)
        return Problem(
            f"arith-{self.seed}-{self.difficulty}-{index}",
            question,
            str(answer),
            "integer",
            {"kind": kind},
        )

    @staticmethod
    def _product(rng: random.Random, d: int):
        a, b = (rng.randrange(10 ** (d + 1), 10 ** (d + 2)) for _ in range(2))
        return f"Compute {a} \u00d7 {b}.", a * b

    @staticmethod
    def _modpow(rng: random.Random, d: int):
        base, exp = rng.randrange(2, 10 ** (d + 1)), rng.randrange(10**d, 10 ** (d + 2))
        mod = rng.randrange(97, 1000)
        return f"What is the remainder when {base}^{exp} is divided by {mod}?", pow(base, exp, mod)

    @staticmethod
    def _factorial_digits(rng: random.Random, d: int):
        n = rng.randrange(10 + 5 * d, 20 + 15 * d)
        return f"What is the sum of the digits of {n}!?", sum(map(int, str(math.factorial(n))))

    @staticmethod
    def _count(rng: random.Random, d: int):
        n = rng.randrange(10 ** (d // 2 + 2), 10 ** (d // 2 + 3))
        a, b = rng.sample(range(3, 14), 2)
        c = rng.choice([k for k in range(2, 10) if k not in (a, b)])
        multiples = lambda *ds: n // math.lcm(*ds)
        count = (
            multiples(a)
            + multiples(b)
            - multiples(a, b)
            - multiples(a, c)
            - multiples(b, c)
            + multiples(a, b, c)
        )
        return (
            f"How many integers k with 1 \u2264 k \u2264 {n} are divisible by {a} or by {b}, "
            f"but not by {c}?"
        ), count

    @staticmethod
    def _gcd_lcm(rng: random.Random, d: int):
        k = 2 + d // 3
        nums = [rng.randrange(10 ** (d // 2 + 1), 10 ** (d // 2 + 3)) for _ in range(k)]
        g = rng.randrange(2, 50)
        nums = [x * g for x in nums]
        if rng.random() < 0.5:
            return f"Find the greatest common divisor of {', '.join(map(str, nums))}.", math.gcd(
                *nums
            )
        nums = nums[:3]
        return (
            f"Find the remainder when the least common multiple of "
            f"{', '.join(map(str, nums))} is divided by 1000."
        ), math.lcm(*nums) % 1000

    @staticmethod
    def _series(rng: random.Random, d: int):
        n = rng.randrange(10 ** (d // 2 + 1), 10 ** (d // 2 + 2))
        p = rng.randrange(2, 2 + d)
        m = rng.randrange(2, 12)
        # k^p mod 1000 depends on k mod 1000, the condition on k mod m: sum whole periods.
        period = math.lcm(1000, m)
        part = lambda upto: sum(pow(k, p, 1000) for k in range(1, upto + 1) if k % m)
        full, rest = divmod(n, period)
        return (
            f"Compute the sum of k^{p} over all integers 1 \u2264 k \u2264 {n} that are not "
            f"multiples of {m}, and give the result modulo 1000."
        ), (full * part(period) + part(rest)) % 1000
