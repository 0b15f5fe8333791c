import threading

import pytest

from toolgrpo.envs.answers import answers_match, last_boxed, parse_integer


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),
        ("\\boxed{7} and a broken \\boxed{8", "7"),
        ("\\boxed 5 apples", "5"),
        ("\\fbox{12}", "12"),
        ("no answer here", None),
        ("\\boxed{}", ""),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("42", 42),
        ("042", 42),
        ("$42$", 42),
        ("42.0", 42),
        ("\\text{42}", 42),
        ("1,000", 1000),
        ("-7", -7),
        ("90^\\circ", 90),
        ("3/2", None),
        ("x=4", None),
        ("", None),
        (None, None),
        ("4.5", None),
        ("1,00", None),
    ],
)
def test_parse_integer(text, expected):
    assert parse_integer(text) == expected


def test_integer_answers_compare_as_integers():
    assert answers_match("042", "42")
    assert answers_match("$42$", "042")
    assert not answers_match("43", "42")
    assert not answers_match(None, "42")
    assert not answers_match("forty-two", "42")
    with pytest.raises(ValueError, match="not an integer"):
        answers_match("1", "\\frac12", kind="integer")


def test_math_answers_use_math_verify_also_off_the_main_thread():
    assert answers_match("0.5", "\\frac{1}{2}", kind="math")
    assert answers_match("2^{1/2}", "\\sqrt{2}")
    assert not answers_match("\\sqrt{3}", "\\sqrt{2}")
    results = []
    t = threading.Thread(
        target=lambda: results.append(
            (answers_match("\\frac{2}{4}", "\\frac{1}{2}"), answers_match("1", "\\frac{1}{2}"))
        )
    )
    t.start()
    t.join()
    assert results == [(True, False)]
