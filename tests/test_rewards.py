import math
import time

import pytest
import torch

from lsp.models import ModelPool
from lsp.selfplay.rewards import (
    CUT_MARK,
    LLMJudgeReward,
    QualitySelfReward,
    RewardSource,
    SequenceClassifierReward,
    encode_padded,
    expected_score,
    fill_unparsed,
    fit_pair,
    score_mass,
    score_token_ids,
)

INSTRUCTIONS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves falling in a quiet park.",
    "2+2?",
    "Explain, in two sentences, why the sky looks blue during the day.",
]
RESPONSES = [
    "Paris.",
    "Leaves drift slowly down / crimson whispers on the wind / the year exhales, still",
    "4",
    "Sunlight scatters off air molecules, and blue light scatters the most. So we see blue.",
]


@pytest.fixture(scope="session")
def pool():
    return ModelPool()  # the default cache: tiny models are built once (~2 s) and reused


def _single_rows(source: RewardSource) -> torch.Tensor:
    return torch.cat([source.score([i], [r]).values for i, r in zip(INSTRUCTIONS, RESPONSES, strict=True)])


def _check_output(out, low: float, high: float, n: int = len(INSTRUCTIONS)):
    assert out.values.shape == (n,) and out.values.dtype == torch.float32
    assert out.values.device.type == "cpu" and torch.isfinite(out.values).all()
    assert ((out.values >= low) & (out.values <= high)).all()
    assert out.parse_failed.shape == (n,) and out.parse_failed.dtype == torch.bool


# ---------------------------------------------------------------- pure functions


def test_expected_score_hand_computed():
    ids = torch.tensor([1, 3])
    values = torch.tensor([0.0, 1.0])
    logits = torch.tensor([
        [9.0, 0.0, 5.0, math.log(3.0), -2.0],  # renormalised over ids: 1/4, 3/4 -> 0.75
        [0.0, 2.0, 0.0, 2.0, 7.0],  # equal logits on ids -> 0.5, whatever the rest holds
    ])
    torch.testing.assert_close(expected_score(logits, ids, values), torch.tensor([0.75, 0.5]))


def test_expected_score_digits():
    # K = 3 tokens worth 0, 1, 2 with probs 0.2, 0.3, 0.5 -> 0.3 + 1.0 = 1.3
    logits = torch.log(torch.tensor([[0.2, 0.3, 0.5, 1e-9]]))
    out = expected_score(logits, torch.tensor([0, 1, 2]), torch.tensor([0.0, 1.0, 2.0]))
    torch.testing.assert_close(out, torch.tensor([1.3]))


def test_score_mass_hand_computed():
    # probs [0.1, 0.2, 0.3, 0.4]; tokens 1 and 3 -> 0.6
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]])).to(torch.bfloat16)
    torch.testing.assert_close(
        score_mass(logits, torch.tensor([1, 3])), torch.tensor([0.6]), atol=1e-2, rtol=0
    )


def test_fill_unparsed_modes():
    values = torch.tensor([2.0, 0.0, 6.0, 0.0])
    parsed = torch.tensor([True, False, True, False])
    # one group: mean of parsed rows (2 + 6) / 2 = 4; midpoint 7 / 2 = 3.5
    assert fill_unparsed(values, parsed, "group_mean", 7).tolist() == [2.0, 4.0, 6.0, 4.0]
    assert fill_unparsed(values, parsed, "midpoint", 7).tolist() == [2.0, 3.5, 6.0, 3.5]
    assert fill_unparsed(values, parsed, "zero", 7).tolist() == [2.0, 0.0, 6.0, 0.0]
    none = torch.zeros(4, dtype=torch.bool)
    assert fill_unparsed(values, none, "group_mean", 7).tolist() == [3.5] * 4
    with pytest.raises(ValueError):
        fill_unparsed(values, parsed, "median", 7)


def test_group_mean_fallback_uses_the_failed_rows_own_group():
    """Issue 35 review: a group [6, 6, 6, fail] beside a group [0, 0, 0, 0] (batch mean of the
    parsed rows 3) must become [6, 6, 6, 6], so the failure adds nothing to its group's
    advantages; the old batch mean gave [6, 6, 6, 3], i.e. advantages +0.75 x 3 and -2.25."""
    from lsp.selfplay.advantages import solver_advantages

    values = torch.tensor([6.0, 6.0, 6.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    parsed = torch.tensor([True, True, True, False, True, True, True, True])
    filled = fill_unparsed(values, parsed, "group_mean", 7, group_size=4)
    assert filled.tolist() == [6.0, 6.0, 6.0, 6.0, 0.0, 0.0, 0.0, 0.0]
    assert solver_advantages(filled.view(2, 4)).abs().max().item() == 0.0
    # a group with no parsed row gets the midpoint, whatever the other groups hold
    nothing = torch.tensor([False] * 4 + [True] * 4)
    assert fill_unparsed(values, nothing, "group_mean", 7, group_size=4)[:4].tolist() == [3.5] * 4
    # the same rows split over two processes (one group each) give the same values
    halves = [fill_unparsed(values[i:i + 4], parsed[i:i + 4], "group_mean", 7, 4) for i in (0, 4)]
    assert torch.equal(torch.cat(halves), filled)
    with pytest.raises(ValueError, match="groups of 3"):
        fill_unparsed(values, parsed, "group_mean", 7, group_size=3)


def test_generate_mode_decodes_with_the_configured_engine(tmp_path):
    """Issue 35 review: `engine=hf` reached the judge's engine but not its SamplingConfig, so our
    own loop decoded anyway, and failed on a model it cannot decode ("use engine: hf"). Here the
    judge's model hides its KV-cache argument (as a model outside transformers' causal LMs
    would): the lsp loop refuses it, HF generate decodes it."""
    from transformers import LlamaForCausalLM

    from lsp.engines import EngineUnavailableError

    class NoCacheArgument(LlamaForCausalLM):  # forward(**kwargs): no KV-cache / logits_to_keep
        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    own = ModelPool(cache_dir=tmp_path)
    own.causal_lm("tiny:causal")[0].__class__ = NoCacheArgument
    quality = QualitySelfReward(own, "tiny:causal", mode="generate", max_new_tokens=6,
                                engine="hf", fallback="midpoint")
    out = quality.score(INSTRUCTIONS, RESPONSES, group_size=2)
    assert len(out.raw) == 4 and torch.isfinite(out.values).all()
    with pytest.raises(EngineUnavailableError, match="use engine: hf"):
        QualitySelfReward(own, "tiny:causal", mode="generate", max_new_tokens=6, engine="lsp")


# ---------------------------------------------------------------- tokenisation helpers


def test_score_token_ids_digits_are_single_tokens(pool):
    _, tok = pool.causal_lm("tiny:causal")
    ids = score_token_ids(tok, "Score: ", 9)
    assert ids.shape == (10,)
    assert [tok.decode([i]) for i in ids.tolist()] == [str(d) for d in range(10)]
    with pytest.raises(ValueError, match="one token"):
        score_token_ids(tok, "Score: ", 10)  # '10' is two tokens


def test_encode_padded_sides_and_truncation(pool):
    _, tok = pool.causal_lm("tiny:causal")  # byte-level: one token per character
    ids, mask = encode_padded(tok, ["abcdef", "ab"], max_length=4, pad_id=0, left=True)
    assert mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert tok.decode(ids[0]) == "cdef" and tok.decode(ids[1, 2:]) == "ab"  # keeps the end
    ids, mask = encode_padded(tok, ["abc", "a"], max_length=8, pad_id=0, left=False)
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]] and ids[1, 1:].tolist() == [0, 0]


def test_fit_pair_keeps_template_and_response_start(pool):
    _, tok = pool.causal_lm("tiny:causal")

    def render(i, r):
        return f"<I>{i}</I><R>{r}</R>Score: "

    instruction, response = "Summarise this.", "word " * 200
    i, r = fit_pair(tok, render, instruction, response, max_length=100)
    assert i == instruction and r.startswith("word word") and r.endswith(CUT_MARK)
    assert len(tok.encode(render(i, r))) <= 100
    # a too-long instruction is cut as well once the response is used up
    i, r = fit_pair(tok, render, "ask " * 100, "ok", max_length=60)
    assert i.startswith("ask ask") and i.endswith(CUT_MARK) and len(tok.encode(render(i, r))) <= 60
    assert fit_pair(tok, render, "a", "b", max_length=100) == ("a", "b")


# ---------------------------------------------------------------- reward sources (tiny models)


def test_sequence_classifier_batched_equals_single(pool):
    rm = SequenceClassifierReward(pool, "tiny:reward", batch_size=8)
    out = rm.score(INSTRUCTIONS, RESPONSES)
    _check_output(out, -math.inf, math.inf)
    assert not out.parse_failed.any() and out.values.std() > 0
    torch.testing.assert_close(out.values, _single_rows(rm), atol=1e-5, rtol=1e-5)


def test_sequence_classifier_pad_equal_to_eos():
    pool = ModelPool()  # own pool: the config is changed below
    rm = SequenceClassifierReward(pool, "tiny:reward", batch_size=4)
    rm.model.config.pad_token_id = rm.pad_id = rm.tokenizer.eos_token_id  # as in Llama RMs
    batched = rm.score(INSTRUCTIONS, RESPONSES).values
    torch.testing.assert_close(batched, _single_rows(rm), atol=1e-5, rtol=1e-5)


def test_sequence_classifier_truncates_long_inputs(pool):
    rm = SequenceClassifierReward(pool, "tiny:reward", max_length=64)
    out = rm.score(["Why?", "Say a lot." * 30], ["Because " * 50, "ok"])
    _check_output(out, -math.inf, math.inf, n=2)


def test_llm_judge_range_and_batched_equals_single(pool):
    judge = LLMJudgeReward(pool, "tiny:causal", batch_size=3)  # chunks of 3 + 1 rows
    out = judge.score(INSTRUCTIONS, RESPONSES)
    _check_output(out, 0.0, 9.0)
    assert out.raw == []
    torch.testing.assert_close(out.values, _single_rows(judge), atol=1e-4, rtol=1e-4)


def test_llm_judge_flags_low_digit_mass(pool):
    # the random tiny model spreads its mass over ~260 byte tokens: about 10/260 on digits
    judge = LLMJudgeReward(pool, "tiny:causal", min_score_mass=0.5)
    out = judge.score(INSTRUCTIONS[:2], RESPONSES[:2])
    assert out.parse_failed.all() and torch.isfinite(out.values).all()


def test_judges_share_weights_through_pool(pool):
    judge = LLMJudgeReward(pool, "tiny:causal")
    quality = QualitySelfReward(pool, "tiny:causal", mode="logits")
    assert judge.model is quality.model is pool.causal_lm("tiny:causal")[0]


def test_quality_logits_mode_range_and_batching(pool):
    quality = QualitySelfReward(pool, "tiny:causal", mode="logits", batch_size=4)
    out = quality.score(INSTRUCTIONS, RESPONSES)
    _check_output(out, 0.0, 7.0)
    torch.testing.assert_close(out.values, _single_rows(quality), atol=1e-4, rtol=1e-4)


def test_quality_generate_mode_unparseable_gives_fallback(pool):
    quality = QualitySelfReward(
        pool, "tiny:causal", mode="generate", max_new_tokens=12, fallback="midpoint"
    )
    out = quality.score(INSTRUCTIONS, RESPONSES)
    _check_output(out, 0.0, 7.0)
    assert out.parse_failed.all()  # random bytes never spell a <Score>
    assert out.values.tolist() == [3.5] * 4 and len(out.raw) == 4


def test_quality_rejects_unknown_options(compose_cfg):
    """Checked at the config boundary against QualitySelfReward's Literal annotations."""
    from lsp.config import ConfigError, validate

    with pytest.raises(ConfigError, match="algo.self_reward.mode='sample'"):
        validate(compose_cfg("experiment=smoke", "algo.self_reward.mode=sample"))
    with pytest.raises(ConfigError, match="algo.self_reward.fallback='median'"):
        validate(compose_cfg("experiment=smoke", "+algo.self_reward.fallback=median"))


# ---------------------------------------------------------------- the embedded SmolLM2


@pytest.mark.slow
def test_smollm2_judges_return_finite_in_range_scores(pool):
    model = "embedded:smollm2-135m-instruct"
    pairs = (INSTRUCTIONS[:2], RESPONSES[:2])
    sources = [
        (LLMJudgeReward(pool, model), 9.0),
        (QualitySelfReward(pool, model, mode="logits"), 7.0),
        (QualitySelfReward(pool, model, mode="generate", max_new_tokens=64), 7.0),
    ]
    for source, high in sources:
        start = time.perf_counter()
        out = source.score(*pairs)
        seconds = time.perf_counter() - start
        _check_output(out, 0.0, high, n=2)
        mode = getattr(source, "mode", "")
        print(f"{source.name} {mode}: {out.values.tolist()} failed={out.parse_failed.tolist()} "
              f"({seconds:.1f} s)")
        for text in out.raw:
            print("  judge said:", text[:200].replace("\n", " | "))
