"""Integer keys are strict (lsp.config.checks): a float for an int, `1e9` from the command line
included, is one line naming the key, for every integer key of every schema (walked, not
listed), and for the integer parameters of `_target_` nodes."""

from __future__ import annotations

import typing

import pytest
from omegaconf import OmegaConf

from lsp.config import ConfigError, validate
from lsp.config.reference import _expand, compose, flatten, schema_fields
from lsp.config.schema import EvaluateConfig, IFEvalConfig, SelectConfig, StudyParams, TrainConfig

# (schema kind, config file, overrides of a valid composed config)
KINDS = {
    "train": (TrainConfig, "train", ["experiment=smoke"]),
    "select": (SelectConfig, "select", ["run_dir=somewhere"]),
    "evaluate": (EvaluateConfig, "evaluate", []),
    "ifeval": (IFEvalConfig, "ifeval", []),
    "study": (StudyParams, "pipeline", ["study=smoke"]),
}


def _takes_int(ann) -> bool:
    if ann is int:
        return True
    return any(_takes_int(a) for a in typing.get_args(ann))


def _int_keys(kind: str) -> list[str]:
    schema, config, overrides = KINDS[kind]
    flat = flatten(compose(config, overrides))
    return [full for key, ann, _ in schema_fields(schema) if _takes_int(ann)
            for full in _expand(key, [flat]) if "<name>" not in full]


def _cases() -> list[tuple[str, str]]:
    return [(kind, key) for kind in KINDS for key in _int_keys(kind)]


CASES = _cases()


def test_the_walk_finds_the_integer_keys():
    keys = {key for _, key in CASES}
    assert {"rollout.solver.max_new_tokens", "trainer.max_steps", "seed", "rollout.num_queries",
            "trainer.devices", "ifeval.limit", "eval.subset.k_per_subset",
            "eval.sanity.n_pairs"} <= keys, keys
    assert len(CASES) >= 40


@pytest.mark.parametrize(("kind", "key"), CASES, ids=[f"{k}:{key}" for k, key in CASES])
def test_a_float_for_an_integer_key_is_one_line_naming_it(compose_cfg, kind, key, value=1e9):
    _, config, overrides = KINDS[kind]
    cfg = compose_cfg(*overrides, config_name=config)
    OmegaConf.update(cfg, key, value, force_add=True)
    with pytest.raises(ConfigError) as err:
        validate(cfg, kind)
    message = str(err.value)
    # a union (sweep_id: str or int) names its first branch: "a valid string"
    assert f"{key}={value!r}: Input should be a valid " in message, message
    assert "\n" not in message


@pytest.mark.parametrize("override", [
    "rollout.solver.max_new_tokens=1e9",  # issue 37: coerced to an int before, then a crash in step 1
    "reward.batch_size=4.0",  # a `_target_` node's PosInt parameter
    "callbacks.degeneration.window=1e3",
    "callbacks.checkpoint.keep_last=2.0",
    "trainer.max_steps=2.5",
    "rollout.group_size=4.0",
])
def test_a_float_from_the_command_line_is_refused(compose_cfg, override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"{key}=.*valid integer"):
        validate(compose_cfg("experiment=smoke", override))


@pytest.mark.parametrize(("override", "prompt"), [
    ("rollout.solver.max_new_tokens=2040", "rollout.solver.max_new_tokens=2040: a prompt of up to"),
    ("rollout.challenger.max_new_tokens=2000", "rollout.challenger.max_new_tokens=2000: a prompt"),
])
def test_lengths_the_context_cannot_hold_are_refused_before_step_1(compose_cfg, workdir, override,
                                                                   prompt):
    """The tiny model holds 2,048 positions (lsp.models): the error names both numbers."""
    from lsp.train import train

    with pytest.raises(ConfigError) as err:
        train(compose_cfg("experiment=smoke", override))
    message = str(err.value)
    assert prompt in message and "max_position_embeddings=2048" in message, message
    assert not list(workdir.rglob("history.csv"))  # no step ran
