import pytest
import torch

from lsp.selfplay.prompts import (
    CHALLENGER_PROMPT,
    DEFAULT_TASK,
    DEFAULT_TEMPLATE,
    END_MARKER,
    START_MARKER,
    check_queries,
    clean_query,
    echo_fraction,
    parse_quality_score,
    render_challenger_prompt,
    render_quality_prompt,
    render_reward_judge_prompt,
)

PROMPT = render_challenger_prompt()


# ---------------------------------------------------------------- rendering


def test_challenger_prompt_defaults_filled_between_markers():
    assert "{task}" not in PROMPT and "{template}" not in PROMPT
    assert f'"{DEFAULT_TASK}"' in PROMPT
    assert f"{START_MARKER}\n{DEFAULT_TEMPLATE}\n{END_MARKER}" in PROMPT
    for part in ("## Background", "## Request", "## Details", "## Rules"):
        assert part in CHALLENGER_PROMPT


def test_challenger_prompt_takes_templates_with_any_braces():
    template = "Solve {equation} where f = {x: 1} and {{escaped}} and {"
    prompt = render_challenger_prompt("Pure & Applied Mathematics", template)
    assert template in prompt and '"Pure & Applied Mathematics"' in prompt


def test_challenger_prompt_substitutes_once():
    # a task text naming the other placeholder is kept literally, not re-expanded
    prompt = render_challenger_prompt(task="write {template}", template="T")
    assert 'task "write {template}"' in prompt


def test_challenger_prompt_empty_task_and_template():
    prompt = render_challenger_prompt("", "")
    assert 'task ""' in prompt and f"{START_MARKER}\n\n{END_MARKER}" in prompt


def test_judge_prompts_wrap_pair_in_tags_and_keep_braces():
    for render in (render_quality_prompt, render_reward_judge_prompt):
        text = render("Format {name} in f'{x}'", "Use {response} and {instruction}.")
        assert "<Instruction>\nFormat {name} in f'{x}'\n</Instruction>" in text
        assert "<Response>\nUse {response} and {instruction}.\n</Response>" in text
    quality = render_quality_prompt("i", "r")
    assert "<Calculation>" in quality and "<Score>" in quality and "100 words" in quality
    assert all(f"{k}." in quality for k in range(1, 8))


# ---------------------------------------------------------------- degenerate-query rule


def test_clean_query_strips_markers_quotes_and_whitespace():
    assert clean_query(f"  {START_MARKER}\nWhat is 2+2?\n{END_MARKER} ") == "What is 2+2?"
    assert clean_query('"Explain "quoted" words."') == 'Explain "quoted" words.'
    assert clean_query("\u201cName three rivers.\u201d") == "Name three rivers."
    assert clean_query("<< template end >>") == ""
    assert clean_query('"') == '"'  # a lone quote is not a pair


def test_check_queries_reasons_in_order():
    raw = ["  \n ", "x" * 50, "Name a colour.", "Write a poem.", "Tell a joke."]
    check = check_queries(raw, PROMPT, max_chars=40, truncated=[True, True, True, False, False])
    assert check.reasons == ["empty", "too_long", "truncated", "", ""]
    assert check.valid.dtype == torch.bool and check.valid.tolist() == [0, 0, 0, 1, 1]
    # invalid queries keep their cleaned text by default
    assert check.queries == ["", "x" * 50, "Name a colour.", "Write a poem.", "Tell a joke."]


def test_check_queries_truncation_flags_tensor_and_switch():
    raw = ["Name a colour.", "Tell a joke."]
    flags = torch.tensor([True, False])
    assert check_queries(raw, PROMPT, 100, flags).reasons == ["truncated", ""]
    assert check_queries(raw, PROMPT, 100, flags, reject_truncated=False).reasons == ["", ""]
    with pytest.raises(ValueError):
        check_queries(raw, PROMPT, 100, [True])


def test_echo_of_prompt_parts_is_rejected():
    echoes = [
        "Do not give the answer, hints, or any information that gives the output away.",
        DEFAULT_TEMPLATE,  # the unfilled template
        "Write ONE input for the task general instruction following. Sure! " * 2,
    ]
    check = check_queries(echoes, PROMPT, max_chars=1000)
    assert check.reasons == ["echo"] * 3


def test_real_queries_are_not_echoes():
    queries = [
        "Write an essay on the causes of the First World War and give it a title.",
        "What is the answer to 17 * 23?",
        "Why is it?",
        "Give me three tips for a job interview, each with a short example.",
    ]
    assert check_queries(queries, PROMPT, max_chars=1000).reasons == [""] * 4


def test_echo_fraction_hand_computed():
    prompt = "a b c d e f g h"
    # 6 words -> n = 6: the only 6-gram is the whole query, which the prompt lacks
    assert echo_fraction("a b c x y z", prompt) == 0.0
    # 3 words -> n = 3; "a b c" occurs -> all covered
    assert echo_fraction("A, b. C!", prompt) == 1.0
    # 8 words, n = 6: "c d e f g h" occurs -> covers 6 of 8 words
    assert echo_fraction("x y c d e f g h", prompt) == pytest.approx(6 / 8)
    assert echo_fraction("a b", prompt) == 0.0  # fewer than 3 words: never an echo


# ---------------------------------------------------------------- quality judge output parsing

WELL_FORMED = (
    "The instruction is clear and the answer is right but terse.\n"
    "<Calculation>1+1+1+1+0+1+0=5</Calculation>\n<Score>5</Score>"
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (WELL_FORMED, 5),
        ("<Score> 6 </Score>", 6),
        ("<score>3", 3),  # missing closing tag, lower case
        ("<Score>4/7</Score>", 4),
        ("<Score>: 2</Score>", 2),
        ("<Score>0</Score>", 0),
        ("<Score>7</Score>", 7),
        ("<Score>2</Score> on reflection <Score>6</Score>", 6),  # the last one counts
        ("<Score>8</Score>", None),  # out of range
        ("<Score>-1</Score>", None),
        ("<Score>4.5</Score>", None),
        ("<Score>9</Score><Calculation>1+1=2</Calculation>", None),  # bad verdict not rescued
        ("<Calculation>1+0+1+0+1+1+0=4</Calculation>", 4),  # no score: the calculation's total
        ("<Calculation>1+0+1+1", 3),  # unclosed, no total: sum of the 0/1 terms
        ("<Calculation>1+1+1+1+1+1+1+1=8</Calculation>", None),
        ("<Calculation>2+3</Calculation>", None),  # terms are not 0/1
        ("<Calculation>a lot</Calculation>", None),
        ("The response deserves a 5.", None),
        ("", None),
        ("<Score></Score>", None),
        ("%$#@ garbage <Sc0re>5", None),
    ],
)
def test_parse_quality_score(text, expected):
    assert parse_quality_score(text) == expected


def test_parse_quality_score_other_scale():
    assert parse_quality_score("<Score>8</Score>", max_score=10) == 8
