"""A data-free, verifiable reward: IFEval-style constraints appended to the Challenger's queries.

The environment of the Challenger/Solver game: for each valid Challenger query, the environment
draws k instructions that a program can check ("no commas", "answer in JSON", "end with 'Any
other questions?'"), the Solver answers the augmented query, and the Solver's reward is the
fraction of the appended instructions its answer satisfies, in IFEval's strict mode. The
Challenger's reward is unchanged: minus the Solver's mean reward. No data is needed: the
instructions and their random arguments come from lm-eval's own IFEval builders, and their
verdicts from lm-eval's own checkers (`lm_eval.tasks.ifeval`, reached through
`lsp.evaluation.ifeval`, which makes NLTK's punkt data available offline); nothing here
re-implements a checker.

- `ConstraintSampler(k, held_out, seed).sample(query)`: k distinct, mutually compatible types,
  drawn from the registry minus `HELD_OUT_TYPES`, each built by its class's `build_description()`
  with random arguments. The first type is uniform over the allowed ones, each next one uniform
  over those compatible with the types drawn so far (lm-eval's `INSTRUCTION_CONFLICTS`, made
  symmetric, plus `EXTRA_CONFLICTS`); a dead end (nothing compatible left) starts the draw again.
- `augment(query, constraints)`: the Solver's query (format below).
- `satisfied` / `constraint_score`: lm-eval's `test_instruction_following_strict`, the function
  IFEval's strict figures come from, so the training reward and the evaluation agree exactly.
  It fails every instruction on an empty or whitespace-only response, whatever the checker says.
- `ConstraintReward`: the reward source (`score(..., constraints=...)`); `CompositeReward`: a
  weighted sum of reward sources, e.g. 1.0 * constraints + 0.1 * llm_judge. A reward whose
  `score` takes the constraints says so with the class attribute `takes_constraints = True`
  (`accepts_constraints`); only then do training and selection draw constraints for it.

Reproducibility: lm-eval's builders draw from Python's global `random` module. The sampler keeps
its own `random.Random(seed)`; around each build it seeds the global generator from it and
restores the global state afterwards, so a sampler's draws depend only on its seed (and the
queries), and code that seeds `random` itself sees the same sequence as without the sampler. Not
thread-safe: two threads must not build constraints at once. The checkers that use `langdetect`
(the change_case and language types) are random unless langdetect is seeded; `ConstraintReward`
seeds it (process-wide, `langdetect_seed`) so the same answer always gets the same reward.

A CompositeReward config must set `_recursive_: false`, so that Hydra leaves the components to
CompositeReward, which builds each with the trainer's `pool`:

    _target_: lsp.selfplay.constraints.CompositeReward
    _recursive_: false
    model: ${model.reference}   # unused here (each component names its own)
    components:
      constraints: {weight: 1.0, reward: {_target_: lsp.selfplay.constraints.ConstraintReward}}
      judge: {weight: 0.1, reward: {_target_: lsp.selfplay.rewards.LLMJudgeReward, model: ...}}
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from numbers import Real

import torch
from torch import Tensor

from lsp.evaluation.ifeval import registry
from lsp.selfplay.records import RewardOutput

# Never drawn in training, so that IFEval can report transfer to instruction types the Solver
# never saw. About a third of the 25 (8 types; 206 of IFEval's 834 instructions), one from every
# group but punctuation (its only type, no_comma, stays: the simplest signal), so each held-out
# type has trained relatives in its group and the figure measures transfer, not a missing skill;
# language has one type and goes out whole: "answer in <one of 97 languages>" is the hardest
# target for a small Solver and the purest test of an unseen type.
HELD_OUT_TYPES: tuple[str, ...] = (
    "keywords:letter_frequency",
    "language:response_language",
    "length_constraints:nth_paragraph_first_word",
    "detectable_content:postscript",
    "detectable_format:multiple_sections",
    "combination:two_responses",
    "startend:quotation",
    "change_case:capital_word_frequency",
)
# Nothing is excluded for needing data: all 25 registered types build from lm-eval's embedded
# word lists and random numbers, combination:repeat_prompt from the query itself. The checkers
# that need data (rephrase, rephrase_paragraph, key_sentences, constrained_start: an original
# message or key sentences) are not in lm-eval's registry, so neither training nor IFEval sees them.

# Pairs that no answer can satisfy together, missing from lm-eval's table: the section markers are
# "Section"/"SECTION" (never all lowercase; "Section" not all capitals), matched case-sensitively.
EXTRA_CONFLICTS: tuple[tuple[str, str], ...] = (
    ("change_case:english_lowercase", "detectable_format:multiple_sections"),
    ("change_case:english_capital", "detectable_format:multiple_sections"),
)
REPEAT_PROMPT = "combination:repeat_prompt"
PROMPT_ARG = "prompt_to_repeat"  # its build_description argument (not "prompt")
# Draws of lm-eval's builders that no strict answer satisfies; the builder is called again.
DEGENERATE = {
    # randint(1, num_paragraphs + 1) is inclusive: paragraph n + 1 of n does not exist.
    "length_constraints:nth_paragraph_first_word":
        lambda a: a["nth_paragraph"] > a["num_paragraphs"],
    # fewer than 1 sentence: only the empty answer, which strict mode fails.
    "length_constraints:number_sentences":
        lambda a: a["relation"] == "less than" and a["num_sentences"] <= 1,
}
MAX_REDRAWS = 100
MAX_RESTARTS = 1000


@dataclass(frozen=True)
class Constraint:
    """One appended instruction: its id, the full arguments of its builder, and its text."""

    instruction_id: str
    kwargs: dict = field(hash=False)
    description: str


Constraints = Sequence[Constraint]


# ---------------------------------------------------------------- building


@contextmanager
def _global_random(seed: int) -> Iterator[None]:
    """Seed Python's global `random` (lm-eval's builders use it) and restore its state after."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def build_constraint(instruction_id: str, query: str = "", **kwargs) -> Constraint:
    """The registry's builder with `kwargs` (missing ones drawn from global `random`);
    repeat_prompt repeats `query` unless `prompt_to_repeat` is given."""
    types = registry()
    if instruction_id not in types:
        raise ValueError(f"unknown instruction id '{instruction_id}'")
    checker = types[instruction_id](instruction_id)
    if PROMPT_ARG in checker.get_instruction_args_keys():
        kwargs.setdefault(PROMPT_ARG, query)
    description = checker.build_description(**kwargs)
    return Constraint(instruction_id, dict(checker.get_instruction_args() or {}), description)


def _build_valid(instruction_id: str, query: str) -> Constraint:
    degenerate = DEGENERATE.get(instruction_id, lambda _: False)
    for _ in range(MAX_REDRAWS):
        constraint = build_constraint(instruction_id, query)
        if not degenerate(constraint.kwargs):
            return constraint
    raise RuntimeError(f"{instruction_id}: {MAX_REDRAWS} degenerate draws in a row")


def conflict_table() -> dict[str, frozenset[str]]:
    """Instruction id -> the ids it cannot be combined with (itself included), symmetric:
    lm-eval's INSTRUCTION_CONFLICTS (one-sided as written; its own `conflict_make` run on a copy,
    since it edits in place) plus EXTRA_CONFLICTS."""
    registry()  # punkt on nltk's path before lm-eval's IFEval code is imported
    from lm_eval.tasks.ifeval import instructions_registry as reg

    table = {t: {t} for t in registry()}
    for t, others in getattr(reg, "INSTRUCTION_CONFLICTS", {}).items():
        table.setdefault(t, {t}).update(others)
    for a, b in EXTRA_CONFLICTS:
        table[a].add(b)
    table = reg.conflict_make(table)
    return {t: frozenset(c) for t, c in table.items()}


def _max_compatible(types: frozenset[str], conflicts: Mapping[str, frozenset[str]]) -> int:
    """The size of the largest mutually compatible subset of `types` (exact search; a type that
    conflicts with none of the others is always taken, which keeps it fast)."""
    if not types:
        return 0
    t = min(types)
    rest = types - {t}
    with_t = 1 + _max_compatible(rest - conflicts[t], conflicts)
    if not conflicts[t] & rest:
        return with_t
    return max(with_t, _max_compatible(rest, conflicts))


class ConstraintSampler:
    """k constraints per query from the non-held-out types (module doc); reproducible for a seed."""

    def __init__(self, k: int = 1, held_out: Sequence[str] = HELD_OUT_TYPES,
                 seed: int | None = None):
        known = registry()
        unknown = sorted(set(held_out) - set(known))
        if unknown:
            raise ValueError(f"unknown held-out instruction ids {unknown}; known: {sorted(known)}")
        self.held_out = tuple(held_out)
        self._allowed = tuple(sorted(set(known) - set(held_out)))
        self._conflicts = conflict_table()
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(self._allowed):
            raise ValueError(f"k must be an int in [1, {len(self._allowed)}] (the allowed "
                             f"types), got {k!r}")
        most = _max_compatible(frozenset(self._allowed), self._conflicts)
        if k > most:
            raise ValueError(f"k={k}, but at most {most} allowed types are mutually compatible")
        self.k = k
        self._rng = random.Random(seed)

    @classmethod
    def from_config(cls, env, seed: int | None) -> ConstraintSampler:
        """From a `rollout.constraints` node ({k, held_out}; held_out null: HELD_OUT_TYPES);
        None (a run saved before the environment existed): k=1 and the default types."""
        if env is None:
            return cls(k=1, seed=seed)
        held_out = HELD_OUT_TYPES if env.get("held_out") is None else list(env["held_out"])
        return cls(k=int(env["k"]), held_out=held_out, seed=seed)

    def reseed(self, seed: int) -> None:
        """Restart the draws from `seed` (the trainer draws one per step from the torch RNG, which
        checkpoints restore, so a resumed run draws the constraints it would have drawn)."""
        self._rng.seed(seed)

    @property
    def allowed_types(self) -> tuple[str, ...]:
        return self._allowed

    def build(self, instruction_id: str, query: str) -> Constraint:
        """One constraint of the given type, its arguments drawn from this sampler's generator."""
        with _global_random(self._rng.getrandbits(64)):
            return _build_valid(instruction_id, query)

    def sample(self, query: str) -> list[Constraint]:
        return [self.build(t, query) for t in self._draw_types(query)]

    def _draw_types(self, query: str) -> list[str]:
        conflicts = self._query_conflicts(query)
        for _ in range(MAX_RESTARTS):
            chosen: list[str] = []
            open_types = list(self._allowed)
            while open_types and len(chosen) < self.k:
                chosen.append(self._rng.choice(open_types))
                open_types = [t for t in open_types if t not in conflicts[chosen[-1]]]
            if len(chosen) == self.k:
                return chosen
        raise RuntimeError(f"no {self.k} mutually compatible types for this query after "
                           f"{MAX_RESTARTS} draws")

    def _query_conflicts(self, query: str) -> Mapping[str, frozenset[str]]:
        # Repeating a query that holds a comma breaks no_comma (lm-eval's table allows the pair:
        # its prompts were written for it).
        if "," not in query:
            return self._conflicts
        pair = {REPEAT_PROMPT, "punctuation:no_comma"}
        return {t: c | (pair - {t}) if t in pair else c for t, c in self._conflicts.items()}


def augment(query: str, constraints: Constraints) -> str:
    """The Solver's query: `query` (trailing whitespace dropped), one blank line, then each
    description on its own line. No constraints: the query unchanged."""
    if not constraints:
        return query
    return query.rstrip() + "\n\n" + "\n".join(c.description for c in constraints)


# ---------------------------------------------------------------- scoring


def satisfied(constraints: Constraints, response: str) -> list[bool]:
    """Per constraint, IFEval's strict verdict on the raw response (lm-eval's own function)."""
    registry()  # punkt on nltk's path before lm-eval's IFEval code is imported
    from lm_eval.tasks.ifeval import utils

    inp = utils.InputExample(key=0, instruction_id_list=[c.instruction_id for c in constraints],
                             prompt="", kwargs=[dict(c.kwargs) for c in constraints])
    return list(utils.test_instruction_following_strict(inp, response).follow_instruction_list)


def constraint_score(constraints: Constraints, response: str) -> float:
    """The fraction of `constraints` the response satisfies (strict)."""
    if not constraints:
        raise ValueError("no constraints to score the response against")
    passed = satisfied(constraints, response)
    return sum(passed) / len(passed)


def seed_langdetect(seed: int) -> None:
    """Make langdetect deterministic, process-wide (its documented way)."""
    from langdetect import DetectorFactory

    DetectorFactory.seed = seed


class ConstraintReward:
    """Reward = fraction of row i's constraints its response satisfies, in [0, 1]."""

    name = "constraints"
    takes_constraints = True  # score(..., constraints=): the environment's (accepts_constraints)

    def __init__(self, pool=None, langdetect_seed: int | None = 0, model: str | None = None):
        # pool and model are accepted and ignored, so the config shape matches the others.
        if langdetect_seed is not None:
            seed_langdetect(langdetect_seed)

    def score(self, instructions: list[str], responses: list[str],
              constraints: Sequence[Constraints] | None = None) -> RewardOutput:
        """Row i against constraints[i]: B rows, so each query's constraints repeat per answer."""
        if constraints is None:
            raise ValueError("ConstraintReward needs constraints=: the environment's constraints "
                             "for each row (lsp.selfplay.constraints.ConstraintSampler)")
        if not len(instructions) == len(responses) == len(constraints):
            raise ValueError(f"{len(instructions)} instructions, {len(responses)} responses and "
                             f"{len(constraints)} constraint rows: must be equal")
        pairs = zip(constraints, responses, strict=True)
        values = torch.tensor([constraint_score(c, r) for c, r in pairs], dtype=torch.float32)
        return RewardOutput(values=values, parse_failed=torch.zeros(len(values), dtype=torch.bool))


# ---------------------------------------------------------------- several rewards at once


def accepts_constraints(reward) -> bool:
    """Whether `reward.score` takes the environment's `constraints=`: declared by the reward's
    class (`takes_constraints = True`), not read off its signature."""
    # getattr with a default: a reward is any `_target_` class a config names (or a test's
    # object), with no base class of ours to inherit the attribute from.
    return bool(getattr(type(reward), "takes_constraints", False))


def _weight(name: str, spec: Mapping) -> float:
    w = spec["weight"]
    if isinstance(w, bool) or not isinstance(w, Real) or not math.isfinite(w):
        raise ValueError(f"reward component '{name}': weight must be a finite number, got {w!r}")
    return float(w)


def _build(name: str, reward, pool):
    if not isinstance(reward, Mapping):  # an already-built reward source (tests)
        if not callable(getattr(reward, "score", None)):
            raise ValueError(f"reward component '{name}': 'reward' must be a config with "
                             f"_target_ or an object with score(), got {type(reward).__name__}")
        return reward
    if "_target_" not in reward:
        raise ValueError(f"reward component '{name}': its 'reward' config has no _target_")
    from hydra.utils import instantiate

    try:
        return instantiate(reward, pool=pool)
    except Exception as err:
        err.add_note(f"while building reward component '{name}'")
        raise


def _check_spec(name: str, spec) -> None:
    if not isinstance(spec, Mapping) or set(spec) != {"weight", "reward"}:
        keys = sorted(spec) if isinstance(spec, Mapping) else type(spec).__name__
        raise ValueError(f"reward component '{name}': expected exactly the keys "
                         f"['reward', 'weight'], got {keys}")


class CompositeReward:
    """values = sum over components of weight * component values; parse_failed = any component's.
    `last_components`: each component's unweighted (B,) values from the last `score` call."""

    name = "composite"
    takes_constraints = True  # passes them on to the components that take them

    def __init__(self, pool=None, components: Mapping[str, Mapping] | None = None,
                 model: str | None = None):  # model: unused (its components name theirs)
        if not components:
            raise ValueError("CompositeReward needs at least one component")
        self.weights: dict[str, float] = {}
        self.rewards: dict = {}
        for name, spec in components.items():
            _check_spec(name, spec)
            self.weights[name] = _weight(name, spec)
            self.rewards[name] = _build(name, spec["reward"], pool)
        self.last_components: dict[str, Tensor] = {}

    def _score_one(self, name: str, instructions, responses, constraints) -> RewardOutput:
        reward = self.rewards[name]
        extra = {"constraints": constraints} if accepts_constraints(reward) else {}
        try:
            return reward.score(instructions, responses, **extra)
        except Exception as err:
            err.add_note(f"in reward component '{name}'")
            raise

    def score(self, instructions: list[str], responses: list[str],
              constraints: Sequence[Constraints] | None = None) -> RewardOutput:
        """`constraints` goes only to the components whose score() takes it."""
        outs = {n: self._score_one(n, instructions, responses, constraints) for n in self.rewards}
        self.last_components = {n: o.values.float() for n, o in outs.items()}
        b = len(responses)
        values = torch.zeros(b, dtype=torch.float32)
        failed = torch.zeros(b, dtype=torch.bool)
        for name, out in outs.items():
            if out.values.shape != (b,):
                raise ValueError(f"reward component '{name}' returned values of shape "
                                 f"{tuple(out.values.shape)}, expected ({b},)")
            values += self.weights[name] * out.values.float()
            failed |= out.parse_failed.bool()
        return RewardOutput(values=values, parse_failed=failed)
