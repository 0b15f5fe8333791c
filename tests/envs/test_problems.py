import json
import pickle
import re
import socket
import subprocess
import sys

import pytest

from toolgrpo.envs.problems import ArithProblems, HubUnavailableError, Problem, load_problems


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_local_files_in_every_format_with_detected_columns(tmp_path):
    import datasets

    rows = [
        {"ID": "1983-1", "Question": "What is 1+1?", "Answer": 2},
        {"ID": "1983-2", "Question": "What is 2+2?", "Answer": 4},
    ]
    jsonl = write_jsonl(tmp_path / "aime.jsonl", rows)
    table = datasets.Dataset.from_list(rows)
    table.to_csv(tmp_path / "aime.csv")
    table.to_parquet(tmp_path / "aime.parquet")
    (tmp_path / "aime.json").write_text(json.dumps(rows))
    for path in (jsonl, tmp_path / "aime.csv", tmp_path / "aime.parquet", tmp_path / "aime.json"):
        problems = load_problems(str(path))
        assert [p.question for p in problems] == ["What is 1+1?", "What is 2+2?"], path
        assert [p.answer for p in problems] == ["2", "4"]
        assert problems[0].id.endswith("#1983-1")


def test_solution_column_contributes_its_boxed_answer(tmp_path):
    path = write_jsonl(
        tmp_path / "math.jsonl",
        [{"problem": "Half of one?", "solution": "It is $\\boxed{\\frac{1}{2}}$."}],
    )
    assert load_problems(path)[0].answer == "\\frac{1}{2}"


def test_row_without_usable_answer_is_named(tmp_path):
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [{"problem": "ok", "answer": "1"}, {"problem": "broken", "answer": ""}],
    )
    with pytest.raises(ValueError, match="row 1"):
        load_problems(path)
    path = write_jsonl(tmp_path / "cols.jsonl", [{"text": "q", "label": "1"}])
    with pytest.raises(ValueError, match="no question column"):
        load_problems(path)
    with pytest.raises(FileNotFoundError):
        load_problems(str(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty"),
        ("\n\n", "has no rows"),
        (
            '{"problem": "1+1?", "answer": "2"}\n{"problem": "2+2?", "answer": 4\n',
            "line 2 is not JSON",
        ),
        ('{"problem": "1+1?", "answer": "2"}\n["2+2?", "4"]\n', "line 2 is not a JSON object"),
    ],
)
def test_broken_problem_files_are_named_with_the_line(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + message):
        load_problems(str(path))


def test_unreadable_csv_names_the_file(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes(b'problem,answer\n"1+1?,2\n')  # an unterminated quote
    with pytest.raises(ValueError, match="problem file .*p.csv"):
        load_problems(str(path))


def test_unreachable_hub_says_so_and_names_the_offline_alternative(tmp_path):
    code = (
        "import json\n"
        "from toolgrpo.envs.problems import load_problems, HubUnavailableError\n"
        "try:\n    load_problems('aime', 'train')\n"
        "except HubUnavailableError as e:\n    print('ERR', e)\n"
        "    print(json.dumps([e.reason, e.offline_hint]))\n"
    )
    env = {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path),
        "PATH": "/usr/bin:/bin",
    }
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2, out.stdout + out.stderr
    line = lines[0]
    assert line.startswith("ERR could not load 'gneubig/aime-1983-2024'"), out.stdout + out.stderr
    assert "local" in line and "aime.jsonl" in line
    # structured: what could not be had (no hint in it), and what to do offline
    reason, hint = json.loads(lines[1])
    assert reason.startswith("could not load 'gneubig/aime-1983-2024' from the Hugging Face Hub")
    assert "Offline, pass" not in reason and "aime.jsonl" not in reason
    assert hint.startswith("Offline, pass a local JSON/JSONL/CSV/Parquet file")
    assert line == f"ERR {reason}. {hint}"


def test_hub_unavailable_error_fields():
    exc = HubUnavailableError("could not load 'x'", "Offline, pass a file.")
    assert (exc.reason, exc.offline_hint) == ("could not load 'x'", "Offline, pass a file.")
    assert str(exc) == "could not load 'x'. Offline, pass a file."
    again = pickle.loads(pickle.dumps(exc))  # e.g. from a worker process
    assert (again.reason, again.offline_hint, str(again)) == (
        exc.reason,
        exc.offline_hint,
        str(exc),
    )


def test_a_plainly_unreachable_hub_fails_at_once_without_retries(tmp_path):
    """No offline variable set; the endpoint refuses connections (nothing listens on the port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "from toolgrpo.envs.problems import load_problems, HubUnavailableError\n"
        "try:\n    load_problems('aime', 'train')\n"
        "except HubUnavailableError as e:\n    print('ERR', e)\n"
    )
    env = {
        "HF_ENDPOINT": f"http://127.0.0.1:{port}",
        "HF_HOME": str(tmp_path),
        "PATH": "/usr/bin:/bin",
    }
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert "Retry" not in out.stderr, out.stderr
    line = out.stdout.strip()
    assert line.startswith(
        "ERR could not load 'gneubig/aime-1983-2024' from the Hugging Face Hub "
        "(the Hub cannot be reached and it is not in the local cache)"
    ), line


def test_arith_is_deterministic_and_unlimited():
    a, b = ArithProblems(3, seed=7), ArithProblems(3, seed=7)
    assert [a[i] for i in range(20)] == [b[i] for i in range(20)]
    assert a[5] != ArithProblems(3, seed=8)[5]
    assert len(a) >= 2**31 and a[2**31 - 1].answer_kind == "integer"
    kinds = {a[i].meta["kind"] for i in range(200)}
    assert kinds == set(ArithProblems.KINDS)
    with pytest.raises(ValueError, match="difficulty"):
        ArithProblems(0)
    with pytest.raises(ValueError, match="unknown"):
        ArithProblems(3, kinds=["poetry"])


def _independent_answer(p: Problem) -> int:
    """Recompute from the question text by another method (closed forms, sympy)."""
    import sympy

    nums = [int(x) for x in re.findall(r"\d+", p.question.replace("\u00d7", " "))]
    kind = p.meta["kind"]
    if kind == "product":
        return nums[0] * nums[1]
    if kind == "modpow":  # square-and-multiply by hand, not Python's pow
        base, exp, mod, result = nums[0] % nums[2], nums[1], nums[2], 1
        while exp:
            if exp & 1:
                result = result * base % mod
            base, exp = base * base % mod, exp >> 1
        return result
    if kind == "factorial_digits":
        return sum(int(c) for c in str(sympy.factorial(nums[0])))
    if kind == "count":  # brute force, where the generator uses inclusion-exclusion
        _, n, a, b, c = nums
        return sum(1 for k in range(1, n + 1) if (k % a == 0 or k % b == 0) and k % c)
    if kind == "gcd_lcm":
        if "greatest" in p.question:
            return int(sympy.gcd_list(nums))
        return int(sympy.lcm_list(nums[:-1])) % 1000
    if kind == "series":
        p_, _, n, m = nums[0], nums[1], nums[2], nums[3]
        k = sympy.Symbol("k", integer=True)
        total = sympy.summation(k**p_, (k, 1, n)) - m**p_ * sympy.summation(k**p_, (k, 1, n // m))
        return int(total) % 1000
    raise AssertionError(kind)


@pytest.mark.parametrize("difficulty", [1, 3, 6])
def test_arith_answers_match_an_independent_computation(difficulty):
    problems = ArithProblems(difficulty, seed=1)
    for i in range(30):
        p = problems[i]
        assert int(p.answer) == _independent_answer(p), p
