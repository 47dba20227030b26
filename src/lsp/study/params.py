"""The DVC study's shared plumbing: params.yaml (composed from conf/pipeline.yaml) -> the config
each lsp entry point takes, and the fixed artifact paths of every stage."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lsp.errors import InputError

ARTIFACTS = Path("artifacts")
BASE_MODEL = ARTIFACTS / "base" / "model"  # the prepared base model (a transformers folder)
TRAIN_KEYS = ("model", "reward", "rollout", "optim", "trainer", "logger", "callbacks",
              "seed", "device")


def load_params(path: str | Path = "params.yaml") -> DictConfig:
    """params.yaml, checked against the study schema (lsp.config.schema.StudyParams): a malformed
    value or a key nothing reads is one line naming it (and the file)."""
    from lsp.config import ConfigError, validate

    params = OmegaConf.load(path)
    try:
        validate(params, "study")
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return params


def use_prepared_base(cfg: DictConfig, base_spec: str, keys: list[str]) -> None:
    """Every model spec that names the base model reads the prepared folder instead."""
    for key in keys:
        if OmegaConf.select(cfg, key) == base_spec:
            OmegaConf.update(cfg, key, str(BASE_MODEL))


class StudyConfigError(InputError):
    """An arm of params.yaml that the study cannot run, with the key to fix."""


# ------------------------------------------------------------------ runs: one arm under one seed

CHALLENGER = "challenger"  # arms.<arm>.queries of a self-play arm (the Challenger writes them)


def run_name(arm: str, seed: int) -> str:
    """The name of one arm trained under one seed (`lsp-0`), or of the base under it (`base-0`):
    its DVC stages (train@lsp-0, ...), artifact folders and MLflow parent run."""
    return f"{arm}-{seed}"


def run_argv(argv: list[str]) -> tuple[str, int]:
    """`<arm> <seed>` from a per-run stage's command line (sys.argv); anything else is one
    `error: usage: ...` line and exit status 2, as for any bad input (lsp.errors)."""
    import sys

    if len(argv) != 3 or not argv[2].isdigit():
        got = " ".join(argv[1:]) or "nothing"
        print(f"error: usage: python {argv[0]} <arm> <seed> (got {got})", file=sys.stderr)
        sys.exit(2)
    return argv[1], int(argv[2])


def split_run(name: str) -> tuple[str, int | None]:
    """`lsp_zero-2` -> ("lsp_zero", 2); a name without a seed suffix -> (name, None)."""
    arm, sep, seed = name.rpartition("-")
    return (arm, int(seed)) if sep and seed.isdigit() else (name, None)


def queries_path(arm: str) -> Path:
    """Where an arm's queries are recorded by the `prompts` stage: a data arm's cleaned prompt
    set, or a self-play arm's Challenger prompt (what train@<arm>-<seed> depends on)."""
    return ARTIFACTS / "queries" / f"{arm}.jsonl"


def arm_queries(params: DictConfig, arm: str) -> str:
    """`challenger`, or the prompt set of a data arm; a mismatch with the arm's algo is refused."""
    spec = params.arms[arm]
    queries, grpo = str(spec.get("queries") or ""), spec.algo.name == "grpo"
    if queries != CHALLENGER and queries not in params.prompt_sets:
        raise StudyConfigError(f"arms.{arm}.queries={queries!r}: expected {CHALLENGER} or a prompt "
                               f"set ({', '.join(params.prompt_sets) or 'none defined'})")
    if grpo == (queries == CHALLENGER):
        raise StudyConfigError(f"arms.{arm}: algo={spec.algo.name} with queries={queries!r}: a grpo "
                               f"arm needs a prompt set, a self-play arm queries: {CHALLENGER}")
    return queries


def train_config(params: DictConfig, arm: str, seed: int) -> DictConfig:
    """The `lsp.train` config of one arm under one seed. An arm (params.arms.<arm>) holds its
    `algo`, `queries` (`challenger`, or the prompt set a data arm draws from) and optional per-arm
    overrides of any training section (e.g. `optim: {lr: 1.0e-6}`). Every arm starts from the
    prepared base model, which is also its KL reference."""
    spec, run = params.arms[arm], run_name(arm, seed)
    cfg = OmegaConf.create({k: params[k] for k in TRAIN_KEYS})
    cfg.algo, cfg.seed = spec.algo, seed
    cfg.name, cfg.run_dir, cfg.resume, cfg.sweep_id = run, str(train_dir(run)), False, None
    keys = ["model.policy", "model.reference", "reward.model", "algo.self_reward.model"]
    # a composite reward's model-backed components (lsp.selfplay.constraints.CompositeReward)
    keys += [f"reward.components.{n}.reward.model" for n in cfg.reward.get("components") or {}]
    use_prepared_base(cfg, params.model.policy, keys)
    if arm_queries(params, arm) != CHALLENGER:
        cfg.rollout.prompt_file = str(queries_path(arm))
    for key in (k for k in TRAIN_KEYS if k in spec):  # per-arm overrides (e.g. GRPO's lr) win
        cfg[key] = OmegaConf.merge(cfg[key], spec[key]) if isinstance(cfg[key], DictConfig) else spec[key]
    return cfg  # its logger: study_logger (the pipeline script), outside the run stamp


def train_dir(run: str) -> Path:
    return ARTIFACTS / "train" / run


RUN_STAMP = "study_run.json"  # in train_dir(run): what the folder's run was trained with


def run_stamp(cfg: DictConfig) -> dict:
    """The fingerprint of one arm's training: its resolved config and the code it ran (the lsp
    package and pipelines/train.py)."""
    import hashlib

    import lsp

    code = hashlib.sha256()
    # the lsp package and the stage script (pipelines/ beside src/, as in the repository)
    stage = Path(lsp.__file__).resolve().parents[2] / "pipelines" / "train.py"
    for f in [*sorted(Path(lsp.__file__).parent.rglob("*")), stage]:
        if f.is_file() and f.suffix in (".py", ".json", ".txt") and "__pycache__" not in f.parts:
            code.update(f.as_posix().encode() + f.read_bytes())
    config = OmegaConf.to_yaml(cfg, resolve=True).encode()
    return {"config": hashlib.sha256(config).hexdigest(), "code": code.hexdigest(),
            "complete": False}


def resume_or_clear(cfg: DictConfig, run: str) -> bool:
    """train@<arm>'s outs are DVC `persist`: DVC leaves them in place when it reruns the stage.
    Rerun after a kill, with the same config and code: True (resume from the last checkpoint).
    Otherwise (a finished run, changed params or code, no stamp): the folder is emptied and
    False (train from step 0), so a stage never mixes two configurations or code versions."""
    import json
    import shutil

    folder, stamp = train_dir(run), run_stamp(cfg)
    old = folder / RUN_STAMP
    if old.exists() and json.loads(old.read_text()) == stamp:
        return True
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    old.write_text(json.dumps(stamp))
    return False


def mark_complete(run: str) -> None:
    import json

    path = train_dir(run) / RUN_STAMP
    path.write_text(json.dumps({**json.loads(path.read_text()), "complete": True}))


# ------------------------------------------------------------------ MLflow: one experiment per study

STUDY_TAGS = ("lsp.study", "lsp.dvc_exp", "lsp.arm")  # what identifies an arm's parent run


def study_experiment(params: DictConfig) -> str:
    return f"lsp-study-{params.study_name}"


def git_commit() -> str:
    """The commit the study runs from: DVC's baseline for `dvc exp run`, else HEAD."""
    import os
    import subprocess

    if os.environ.get("DVC_EXP_BASELINE_REV"):
        return os.environ["DVC_EXP_BASELINE_REV"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def parent_params(params: DictConfig, name: str) -> dict:
    """What tells the runs apart in a run comparison (the full config is the train run's)."""
    arm, seed = split_run(name)
    if arm not in params.arms:
        return {"model": params.model.policy, "seed": seed}
    algo = params.arms[arm].algo
    out = {"arm": arm, "seed": seed, "algo": algo.name, "beta": algo.beta,
           "queries": params.arms[arm].queries,
           "reward": str(params.reward.get("_target_", "")).rsplit(".", 1)[-1],
           "max_steps": params.trainer.max_steps}
    sr = algo.get("self_reward") or {}
    out["self_reward"] = sr.get("mode") if sr.get("enabled") else "off"
    return out


def study_logger(params: DictConfig, name: str, stage: str,
                 new_parent: bool = False) -> DictConfig | None:
    """The logger config of one stage run of study model `name` (an arm, or the base): the study's
    own experiment (lsp-study-<study_name>), nested under the model's parent run, tagged with
    the study, the model, the DVC experiment (DVC_EXP_NAME under `dvc exp run`, else
    `workspace`) and the git commit. The parent run is the newest one with the same study, DVC
    experiment and model; `new_parent` (an arm's training from step 0) starts a new one, so a
    retrained arm's selection and evaluation nest under its new training."""
    import os

    from lsp.tracking import parent_run

    if params.get("logger") is None:
        return None
    cfg = OmegaConf.create(OmegaConf.to_container(params.logger, resolve=True))
    cfg.experiment_name = study_experiment(params)
    exp = os.environ.get("DVC_EXP_NAME") or "workspace"
    key = dict(zip(STUDY_TAGS, (str(params.study_name), exp, name), strict=True))
    tags = {**key, "lsp.git_commit": git_commit()}
    parent_name = name if exp == "workspace" else f"{name} ({exp})"
    cfg.parent_run_id = parent_run(cfg, parent_name, {**key, "lsp.role": "parent"}, new_parent,
                                   extra={"lsp.git_commit": tags["lsp.git_commit"]},
                                   params=parent_params(params, name))
    cfg.tags = {**tags, "lsp.stage": stage}
    cfg.run_name = f"{name}-{stage}"
    return cfg


METRICS = Path("metrics")  # the DVC metrics: a few curated figures per stage and model (lsp.headline)


def metrics_file(stage: str, name: str) -> Path:
    return METRICS / stage / f"{name}.json"


def select_dir(run: str) -> Path:
    return ARTIFACTS / "select" / run


def generate_dir(name: str) -> Path:
    return ARTIFACTS / "generate" / name


def evaluate_dir(run: str) -> Path:
    return ARTIFACTS / "evaluate" / run


def _seed_of(name: str) -> int:
    seed = split_run(name)[1]
    if seed is None:
        raise StudyConfigError(f"{name!r} is not a study run name (<arm>-<seed> or base-<seed>)")
    return seed


def eval_config(params: DictConfig, name: str) -> DictConfig:
    """The `lsp.evaluate` config of one study run (`lsp-0`; or `base-0`): the run as candidate,
    the prepared base model sampled under the same seed (`base-<seed>`) as baseline, generations
    shared through artifacts/generate/."""
    seed = _seed_of(name)
    cfg = OmegaConf.create({
        "model": params.model, "eval": params.eval, "logger": params.logger,
        "candidate": {"model": str(BASE_MODEL), "name": name, "selection": None},
        "base": {"model": str(BASE_MODEL), "name": run_name("base", seed)},
        "out_dir": str(evaluate_dir(name)), "generations_dir": str(ARTIFACTS / "generate" / "{generator}"),
        "device": params.device, "model_cache_dir": params.model_cache_dir, "seed": seed,
    })
    use_prepared_base(cfg, params.model.policy, ["eval.judge.model"])
    return cfg


def ifeval_dir(name: str) -> Path:
    return ARTIFACTS / "ifeval" / name


def ifeval_config(params: DictConfig, name: str) -> DictConfig:
    """The `lsp.ifeval` config of one study run (a run's selected checkpoint, or `base-<seed>`,
    the prepared base): the AlpacaEval generation settings, the study's `ifeval` section, the
    run's seed."""
    seed = _seed_of(name)
    cfg = OmegaConf.create({
        "model": params.model, "eval": {"generation": params.eval.generation},
        "ifeval": params.ifeval, "logger": params.logger,
        "candidate": {"model": str(BASE_MODEL), "name": name, "selection": None},
        "base": {"model": str(BASE_MODEL), "name": run_name("base", seed)},
        "out_dir": str(ARTIFACTS / "ifeval"), "device": params.device,
        "model_cache_dir": params.model_cache_dir, "seed": seed,
    })
    if split_run(name)[0] != "base":
        cfg.candidate.selection = str(select_dir(name) / "selection.json")
    return cfg
