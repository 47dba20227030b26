"""Build conf/prompts/train_instructions.jsonl: the GRPO control arm's training instructions.

Origin: authored for this project (no package ships an instruction-tuning set offline). The
64 hand-written instructions of conf/prompts/grpo_example.jsonl, plus every pairing of 24 task
templates with 30 everyday topics (720), shuffled with a fixed seed. Deterministic: rerunning this
script rewrites the same file. The instructions carry no formatting constraints; the training
environment appends its own (seen IFEval types only, rollout.constraints), as for the self-play
arms. The `prompts` stage drops any exact or 8-word-overlap match with AlpacaEval and IFEval, and
tests/test_train_instructions.py checks the committed file against both sets.

    python pipelines/make_instructions.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TEMPLATES = [
    "Explain how {t} works to someone who has never heard of it.",
    "Write a short story in which {t} plays an important part.",
    "Give three practical tips for a beginner interested in {t}.",
    "What are the main advantages and disadvantages of {t}?",
    "Write a friendly email inviting a colleague to a talk about {t}.",
    "Summarise the history of {t} in a few sentences.",
    "Describe a common misconception about {t} and correct it.",
    "Write a poem of two stanzas about {t}.",
    "Compare {t} with something similar and name the key differences.",
    "Suggest a weekend plan for a family that wants to learn about {t}.",
    "List the questions a journalist might ask an expert on {t}.",
    "Write a product description for a beginner's guide to {t}.",
    "How could a small town make better use of {t}?",
    "Write a dialogue between a teacher and a student about {t}.",
    "Give a step-by-step explanation of how to get started with {t}.",
    "Why do some people dislike {t}? Give a balanced answer.",
    "Write a motivational speech for a club devoted to {t}.",
    "Describe what a typical day looks like for someone who works with {t}.",
    "Propose a school project about {t} for twelve-year-olds.",
    "Write a short review of an imaginary museum exhibition about {t}.",
    "What skills does a person need to be good at {t}?",
    "Write a news headline and a two-sentence report about a discovery in {t}.",
    "Explain the role of {t} in everyday life with two examples.",
    "Draft a to-do list for organising a community event about {t}.",
]

TOPICS = [
    "bread baking", "beekeeping", "solar panels", "public libraries", "bicycle repair",
    "composting", "bird watching", "chess openings", "recycling plastic", "rainwater harvesting",
    "pottery", "urban gardening", "night-time astronomy", "first aid", "sourdough starters",
    "hiking safety", "train travel", "sign language", "home budgeting", "volunteering",
    "wind turbines", "knitting", "photography in low light", "board game design", "mushroom foraging",
    "city parks", "electric scooters", "learning a second language", "birdhouse building",
    "tide pools",
]

EXAMPLES = Path(__file__).resolve().parents[1] / "conf" / "prompts" / "grpo_example.jsonl"
OUT = EXAMPLES.with_name("train_instructions.jsonl")
SEED = 0


def instructions() -> list[str]:
    authored = [json.loads(line)["instruction"] for line in EXAMPLES.read_text().splitlines()
                if line.strip()]
    templated = [t.format(t=topic) for t in TEMPLATES for topic in TOPICS]
    rows = authored + templated
    random.Random(SEED).shuffle(rows)
    return rows


def main() -> None:
    rows = instructions()
    OUT.write_text("".join(json.dumps({"instruction": r}) + "\n" for r in rows), encoding="utf-8")
    print(f"{len(rows)} instructions -> {OUT}")


if __name__ == "__main__":
    main()
