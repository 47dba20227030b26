"""The constraint environment: lm-eval's checkers on hand-written answers through the reward, the
sampler's draws (held-out types, conflicts, seeds, the global `random` state), `augment`, and the
weighted CompositeReward on hand-computed values. No model is loaded."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from hydra.utils import instantiate

from lsp.selfplay import constraints as C
from lsp.selfplay.records import RewardOutput
from lsp.selfplay.rewards import LengthReward

QUERY = "Write a short story about a lighthouse keeper."
NO_COMMA = "punctuation:no_comma"
REPEAT = "combination:repeat_prompt"


def _score(constraints, response) -> float:
    out = C.ConstraintReward().score(["q"], [response], constraints=[constraints])
    return out.values.item()


# ---------------------------------------------------------------- the reward on hand-written answers


@pytest.mark.parametrize(
    ("instruction_id", "kwargs", "response", "value"),
    [
        (NO_COMMA, {}, "a, b", 0.0),
        (NO_COMMA, {}, "a b", 1.0),
        # The checker passes "" (no comma in it); IFEval's strict rule fails any blank answer.
        (NO_COMMA, {}, "", 0.0),
        (NO_COMMA, {}, "   \n", 0.0),
        ("change_case:english_lowercase", {},
         "the old keeper climbed the stairs every night to light the lamp for the ships.", 1.0),
        ("change_case:english_lowercase", {},
         "The old keeper climbed the stairs every night to light the lamp for the ships.", 0.0),
        ("detectable_format:json_format", {}, '{"story": "a keeper"}', 1.0),
        ("detectable_format:json_format", {}, '```json\n{"story": "a keeper"}\n```', 1.0),
        ("detectable_format:json_format", {}, "story: a keeper", 0.0),
        ("startend:end_checker", {"end_phrase": "Any other questions?"},
         "The lamp stayed lit. Any other questions?", 1.0),
        ("startend:end_checker", {"end_phrase": "Any other questions?"},
         "Any other questions? The lamp stayed lit.", 0.0),
        ("length_constraints:number_words", {"num_words": 5, "relation": "at least"},
         "one two three four five", 1.0),
        ("length_constraints:number_words", {"num_words": 5, "relation": "at least"},
         "one two three four", 0.0),
        ("length_constraints:number_words", {"num_words": 5, "relation": "less than"},
         "one two three four", 1.0),
    ],
)
def test_the_reward_is_the_official_strict_verdict(instruction_id, kwargs, response, value):
    assert _score([C.build_constraint(instruction_id, **kwargs)], response) == value


def test_two_constraints_one_satisfied_score_one_half():
    cs = [C.build_constraint(NO_COMMA),
          C.build_constraint("startend:end_checker", end_phrase="Any other questions?")]
    assert C.satisfied(cs, "Yes, it was. Any other questions?") == [False, True]
    assert _score(cs, "Yes, it was. Any other questions?") == 0.5
    assert _score(cs, "Yes it was. Any other questions?") == 1.0


def test_repeat_prompt_repeats_the_query_it_was_built_for():
    c = C.build_constraint(REPEAT, QUERY)
    assert c.kwargs == {"prompt_to_repeat": QUERY}
    assert _score([c], QUERY + "\nOnce upon a time...") == 1.0
    assert _score([c], "Sure! " + QUERY) == 0.0


def test_rows_are_scored_against_their_own_constraints():
    rows = [[C.build_constraint(NO_COMMA)], [C.build_constraint("detectable_format:json_format")]]
    out = C.ConstraintReward().score(["q", "q"], ["a b", "a b"], constraints=rows)
    assert out.values.tolist() == [1.0, 0.0]
    assert out.values.dtype == torch.float32 and out.parse_failed.tolist() == [False, False]


def test_the_reward_seeds_langdetect_so_a_verdict_does_not_change():
    import langdetect

    C.ConstraintReward(langdetect_seed=0)
    assert langdetect.DetectorFactory.seed == 0
    # unseeded, langdetect calls this text 'so' or 'tl' from one call to the next
    assert len({langdetect.detect("yes no maybe so") for _ in range(50)}) == 1


def test_the_reward_needs_the_constraints():
    reward = C.ConstraintReward()
    with pytest.raises(ValueError, match="needs constraints="):
        reward.score(["q"], ["a"])
    with pytest.raises(ValueError, match="must be equal"):
        reward.score(["q", "q"], ["a", "b"], constraints=[[C.build_constraint(NO_COMMA)]])
    with pytest.raises(ValueError, match="no constraints"):
        C.constraint_score([], "a")


# ---------------------------------------------------------------- the sampler


def _draws(sampler, n, query=QUERY):
    return [sampler.sample(query) for _ in range(n)]


def test_held_out_types_are_known_spread_and_about_a_third():
    groups = {t.split(":")[0] for t in C.HELD_OUT_TYPES}
    assert set(C.HELD_OUT_TYPES) <= set(C.registry())
    assert len(C.registry()) == 25 and len(C.HELD_OUT_TYPES) == 8
    assert len(groups) == 8  # one per group; punctuation has a single type and stays in training
    assert len(C.ConstraintSampler().allowed_types) == 17


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_sampler_never_draws_a_held_out_type_and_covers_the_allowed(seed):
    sampler = C.ConstraintSampler(k=1, seed=seed)
    drawn = {c.instruction_id for row in _draws(sampler, 600) for c in row}
    assert drawn == set(sampler.allowed_types)
    assert not drawn & set(C.HELD_OUT_TYPES)


@pytest.mark.parametrize(("k", "seed"), [(2, 0), (3, 1), (12, 2)])
def test_the_sampler_draws_k_distinct_compatible_types(k, seed):
    table = C.conflict_table()
    for row in _draws(C.ConstraintSampler(k=k, seed=seed), 200):
        ids = [c.instruction_id for c in row]
        assert len(set(ids)) == k
        assert not set(ids) & set(C.HELD_OUT_TYPES)
        assert all(b not in table[a] for a, b in itertools.combinations(ids, 2))


def test_the_conflict_table_is_lm_evals_made_symmetric():
    table = C.conflict_table()
    # lm-eval lists english_capital only under english_lowercase's entry.
    assert "change_case:english_lowercase" in table["change_case:english_capital"]
    assert "detectable_format:multiple_sections" in table["change_case:english_lowercase"]
    assert all(a in table[a] for a in table)
    assert all(a in table[b] for a in table for b in table[a])


def test_repeating_a_query_with_a_comma_is_never_paired_with_no_comma():
    def pairs(query):
        rows = _draws(C.ConstraintSampler(k=2, seed=0), 2000, query)
        return sum({c.instruction_id for c in row} == {REPEAT, NO_COMMA} for row in rows)

    assert pairs("Tell me a story about a lighthouse keeper.") > 0
    assert pairs("Tell me, briefly, a story about a lighthouse keeper.") == 0


def test_a_seed_reproduces_the_draws_whatever_the_global_random_does():
    first = _draws(C.ConstraintSampler(k=2, seed=7), 30)
    again = C.ConstraintSampler(k=2, seed=7)
    second = []
    for _ in range(30):
        random.seed(12345)
        random.random()
        second.append(again.sample(QUERY))
    assert first == second
    assert first != _draws(C.ConstraintSampler(k=2, seed=8), 30)


def test_sampling_leaves_the_global_random_state_as_it_was():
    random.seed(2024)
    expected = [random.random() for _ in range(3)]
    random.seed(2024)
    sampler = C.ConstraintSampler(k=3, seed=0)
    got = []
    for _ in range(3):
        sampler.sample(QUERY)
        got.append(random.random())
    assert got == expected


def test_degenerate_draws_of_lm_evals_builders_are_redrawn():
    # lm-eval draws nth_paragraph in 1..num_paragraphs + 1 (inclusive): without the redraw about a
    # third of these would ask for a paragraph that cannot exist.
    sampler = C.ConstraintSampler(held_out=(), seed=0)
    for _ in range(200):
        a = sampler.build("length_constraints:nth_paragraph_first_word", QUERY).kwargs
        assert 1 <= a["nth_paragraph"] <= a["num_paragraphs"]
        s = sampler.build("length_constraints:number_sentences", QUERY).kwargs
        assert not (s["relation"] == "less than" and s["num_sentences"] <= 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, r"k must be an int in \[1, 17\]"),
        ({"k": 18}, r"k must be an int in \[1, 17\]"),
        ({"k": True}, "k must be an int"),
        # 17 allowed; constrained_response, json_format and repeat_prompt conflict with nearly
        # all, and number_paragraphs/number_sentences, english_capital/english_lowercase exclude
        # each other: 17 - 3 - 2 = 12.
        ({"k": 13}, "at most 12 allowed types are mutually compatible"),
        ({"held_out": ["punctuation:no_comma", "no:such", "also:not"]},
         r"unknown held-out instruction ids \['also:not', 'no:such'\]"),
    ],
)
def test_bad_sampler_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        C.ConstraintSampler(**kwargs)


# ---------------------------------------------------------------- every type, data-free


@pytest.mark.parametrize("instruction_id", sorted(C.registry()))
def test_every_type_builds_data_free_and_reaches_the_solver(instruction_id):
    sampler = C.ConstraintSampler(held_out=(), seed=0)
    c = sampler.build(instruction_id, QUERY)
    assert c.instruction_id == instruction_id and c.description.strip()
    assert c.description in C.augment(QUERY, [c])
    # the stored arguments are complete: they rebuild the same instruction, as IFEval scores it
    assert C.build_constraint(instruction_id, **c.kwargs).description == c.description


def test_every_allowed_type_is_drawable_by_the_default_sampler():
    assert set(C.ConstraintSampler().allowed_types) == set(C.registry()) - set(C.HELD_OUT_TYPES)


def test_augment_appends_one_blank_line_then_one_description_per_line():
    a = C.build_constraint(NO_COMMA)
    b = C.build_constraint("detectable_format:title")
    assert C.augment("Tell me a story.  \n", [a, b]) == (
        "Tell me a story.\n\n"
        "In your entire response, refrain from the use of any commas.\n"
        "Your answer must contain a title, wrapped in double angular brackets,"
        " such as <<poem of joy>>."
    )
    assert C.augment("Tell me a story.", []) == "Tell me a story."


# ---------------------------------------------------------------- CompositeReward


class _Fixed:
    """A reward source with set outputs, recording whether it was given constraints."""

    name = "fixed"

    def __init__(self, values, failed):
        self.values, self.failed = values, failed

    def score(self, instructions, responses):
        return RewardOutput(values=torch.tensor(self.values, dtype=torch.float32),
                            parse_failed=torch.tensor(self.failed))


class _Spy(_Fixed):
    takes_constraints = True

    def score(self, instructions, responses, constraints=None):
        self.got = constraints
        return super().score(instructions, responses)


def _components(length_weight=10.0, constraint_weight=2.0):
    return {
        "length": {"weight": length_weight,
                   "reward": {"_target_": "lsp.selfplay.rewards.LengthReward", "per_char": 0.01}},
        "constraints": {"weight": constraint_weight,
                        "reward": {"_target_": "lsp.selfplay.constraints.ConstraintReward"}},
    }


def test_composite_is_the_weighted_sum_with_each_component_exposed():
    composite = C.CompositeReward(pool=None, components=_components())
    rows = [[C.build_constraint(NO_COMMA)]] * 2
    out = composite.score(["q", "q"], ["a, b", "a b c"], constraints=rows)
    # length: 0.01 * (4, 5) chars; no_comma: (0, 1) -> 10 * (0.04, 0.05) + 2 * (0, 1)
    assert torch.allclose(out.values, torch.tensor([0.4, 2.5]))
    assert torch.allclose(composite.last_components["length"], torch.tensor([0.04, 0.05]))
    assert composite.last_components["constraints"].tolist() == [0.0, 1.0]
    assert out.parse_failed.tolist() == [False, False]


def test_composite_builds_from_a_hydra_config_without_recursion():
    cfg = {"_target_": "lsp.selfplay.constraints.CompositeReward", "_recursive_": False,
           "model": "unused", "components": _components(1.0, 1.0)}
    composite = instantiate(cfg, pool=None)
    assert isinstance(composite.rewards["length"], LengthReward)
    assert isinstance(composite.rewards["constraints"], C.ConstraintReward)
    out = composite.score(["q"], ["a b"], constraints=[[C.build_constraint(NO_COMMA)]])
    assert out.values.item() == pytest.approx(0.03 + 1.0)


def test_constraints_go_only_to_components_that_take_them():
    spy = _Spy([1.0, 2.0], [False, True])
    composite = C.CompositeReward(components={
        "plain": {"weight": 1.0, "reward": _Fixed([3.0, 4.0], [True, False])},
        "spy": {"weight": -0.5, "reward": spy},
    })
    rows = [[C.build_constraint(NO_COMMA)]] * 2
    out = composite.score(["q", "q"], ["a", "b"], constraints=rows)
    assert spy.got is rows  # _Fixed.score takes no constraints: it would have raised TypeError
    assert out.values.tolist() == [2.5, 3.0]
    assert out.parse_failed.tolist() == [True, True]


def test_a_constraint_component_without_constraints_is_a_clear_error():
    composite = C.CompositeReward(components=_components())
    with pytest.raises(ValueError, match="needs constraints=") as err:
        composite.score(["q"], ["a"])
    assert "in reward component 'constraints'" in err.value.__notes__


@pytest.mark.parametrize(
    ("components", "message"),
    [
        ({}, "at least one component"),
        (None, "at least one component"),
        ({"judge": {"weight": math.nan, "reward": LengthReward()}},
         "'judge': weight must be a finite number"),
        ({"judge": {"weight": math.inf, "reward": LengthReward()}},
         "'judge': weight must be a finite number"),
        ({"judge": {"weight": "1", "reward": LengthReward()}},
         "'judge': weight must be a finite number"),
        ({"judge": {"weight": True, "reward": LengthReward()}},
         "'judge': weight must be a finite number"),
        ({"judge": {"reward": LengthReward()}}, "'judge': expected exactly the keys"),
        ({"judge": 1.0}, "'judge': expected exactly the keys"),
        ({"judge": {"weight": 1.0, "reward": {"per_char": 1.0}}}, "'judge'.*no _target_"),
        ({"judge": {"weight": 1.0, "reward": 3}}, "'judge'.*object with score"),
    ],
)
def test_bad_components_are_named(components, message):
    with pytest.raises(ValueError, match=message):
        C.CompositeReward(pool=None, components=components)


def test_taking_constraints_is_declared_not_read_off_the_signature():
    class Undeclared(_Fixed):  # takes them, but does not say so
        def score(self, instructions, responses, constraints=None):
            return super().score(instructions, responses)

    assert C.accepts_constraints(C.ConstraintReward())
    assert C.accepts_constraints(C.CompositeReward(components={
        "plain": {"weight": 1.0, "reward": _Fixed([1.0], [False])}}))
    assert C.accepts_constraints(_Spy([1.0], [False]))
    assert not C.accepts_constraints(_Fixed([1.0], [False]))
    assert not C.accepts_constraints(Undeclared([1.0], [False]))
    assert not C.accepts_constraints(LengthReward())
