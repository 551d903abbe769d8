"""Write sample_chains.json: annotated reasoning chains written for lmlab (deterministic).

Run ``python src/lmlab/data/chains/make_sample.py`` to regenerate; the output is the
backtracking data's format (DESIGN.md section 4). Each chain solves a small math or logic
problem; most contain a slip followed by a backtracking span. About half of the
backtracking spans start with "Wait" and "wait" also occurs outside them, so a
token-identity baseline is informative but beatable. A third of the annotations drop a
sentence or re-space a paragraph break, as the real annotator did.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

N_CHAINS = 180
SEED = 20261125

Step = tuple[str | None, str]  # (label or None for untagged text, sentence)

_BACKTRACK_OPENERS = [
    ("Wait, ", 9), ("Wait, no. ", 4), ("Hmm, wait. ", 2), ("Actually, ", 3), ("Hold on, ", 2),
    ("No, that's not right. ", 2), ("Oops, ", 1), ("Let me re-check that. ", 2),
    ("On second thought, ", 1), ("Hmm, that can't be right. ", 2),
]
_BACKTRACK_REASONS = [
    "I made an arithmetic slip there.",
    "that step is wrong.",
    "I used the wrong operation.",
    "that doesn't match the numbers in the problem.",
    "I mixed up the two quantities.",
    "that answer is too large to make sense.",
]
_UNCERTAIN = [
    "I'm not completely sure this approach is the intended one.",
    "Hmm, I might be missing a detail here.",
    "This seems plausible, but let me be careful.",
    "I think this is right, though I should double-check.",
    "I'm fairly confident, but not certain.",
]
_INIT = ["Okay, so I need to figure out {q}.", "Let me start by restating the problem: {q}.",
         "Alright, the question asks for {q}.", "First, let me understand what is being asked: {q}."]
_FILLER = ["Okay.", "Let me think.", "So far so good.", "Next step.", "Let's see."]


def _pick(rng: random.Random, weighted: list[tuple[str, int]]) -> str:
    return rng.choices([w for w, _ in weighted], weights=[n for _, n in weighted])[0]


def shopping(rng: random.Random) -> dict:
    price, count = rng.randint(2, 9), rng.randint(3, 12)
    bill = 10 * ((price * count) // 10 + 1 + rng.randint(0, 2))
    total, change = price * count, bill - price * count
    wrong = total + rng.choice([-2, 2, 4, -4])
    return dict(
        problem=f"A store sells notebooks for ${price} each. Maya buys {count} notebooks and pays "
                f"with a ${bill} bill. How much change does she get?",
        q="the change Maya gets",
        knowledge="Change is the amount paid minus the total cost.",
        right=f"The total cost is {count} times ${price}, which is ${total}.",
        wrong=f"The total cost is {count} times ${price}, which is ${wrong}.",
        fix=f"{count} times {price} is {total}, not {wrong}.",
        rest=[f"So the change is ${bill} minus ${total}, which is ${change}."],
        test=f"Checking: ${total} plus ${change} gives back ${bill}.",
        answer=f"Maya gets ${change} in change.")


def speed(rng: random.Random) -> dict:
    hours = rng.randint(2, 6)
    kmh = rng.randint(4, 12) * 10
    dist = hours * kmh
    wrong = dist * hours
    return dict(
        problem=f"A train travels {dist} km in {hours} hours at a constant pace. What is its "
                "average speed?",
        q="the average speed of the train",
        knowledge="Average speed is distance divided by time.",
        right=f"So the speed is {dist} divided by {hours}.",
        wrong=f"So the speed is {dist} times {hours}, which is {wrong} km/h.",
        fix=f"speed is distance divided by time, so I should divide {dist} by {hours}.",
        rest=[f"{dist} divided by {hours} is {kmh}."],
        test=f"Checking: {kmh} km/h for {hours} hours covers {kmh * hours} km.",
        answer=f"The average speed is {kmh} km/h.")


def rectangle(rng: random.Random) -> dict:
    w, h = rng.randint(3, 15), rng.randint(3, 15)
    per, area = 2 * (w + h), w * h
    return dict(
        problem=f"A garden is a rectangle {w} m wide and {h} m long. How much fencing is needed "
                "to go all the way around it?",
        q="the perimeter of the garden",
        knowledge="The perimeter of a rectangle is twice the sum of its width and length.",
        right=f"The width plus the length is {w + h} m.",
        wrong=f"The fencing needed is {w} times {h}, which is {area} m.",
        fix=f"{area} is the area, not the perimeter; I need the distance around.",
        rest=[f"The width plus the length is {w + h} m.", f"Twice that is {per} m."],
        test=f"Checking: {w} + {h} + {w} + {h} = {per}.",
        answer=f"The garden needs {per} m of fencing.")


def discount(rng: random.Random) -> dict:
    price = rng.randint(4, 20) * 10
    pct = rng.choice([10, 20, 25, 30, 40, 50])
    off = price * pct // 100
    return dict(
        problem=f"A jacket costs ${price} and is on sale for {pct}% off. What is the sale price?",
        q="the sale price of the jacket",
        knowledge=f"{pct}% of an amount is the amount times {pct} over 100.",
        right=f"The discount is {pct}% of ${price}, which is ${off}.",
        wrong=f"The sale price is {pct}% of ${price}, which is ${off}.",
        fix=f"${off} is the discount itself, so I still have to subtract it from the price.",
        rest=[f"The discount is ${off}.", f"So the sale price is ${price} minus ${off}, which is "
                                         f"${price - off}."],
        test=f"Checking: ${price - off} plus ${off} is ${price}.",
        answer=f"The sale price is ${price - off}.")


def series(rng: random.Random) -> dict:
    n = rng.randint(8, 40)
    total = n * (n + 1) // 2
    return dict(
        problem=f"What is the sum of all whole numbers from 1 to {n}?",
        q=f"the sum 1 + 2 + ... + {n}",
        knowledge="The sum of the first n whole numbers is n times (n + 1) divided by 2.",
        right=f"Here n is {n}, so the sum is {n} times {n + 1} over 2.",
        wrong=f"Here n is {n}, so the sum is {n} times {n + 1}, which is {n * (n + 1)}.",
        fix="I forgot to divide by 2.",
        rest=[f"{n} times {n + 1} is {n * (n + 1)}.", f"Half of that is {total}."],
        test="Testing the formula with n = 3: 1 + 2 + 3 = 6, and 3 times 4 over 2 is 6.",
        answer=f"The sum is {total}.")


def remainder(rng: random.Random) -> dict:
    k = rng.randint(3, 9)
    number = rng.randint(20, 200)
    q, r = divmod(number, k)
    wrong_q = q + 1
    return dict(
        problem=f"What is the remainder when {number} is divided by {k}?",
        q=f"the remainder of {number} divided by {k}",
        knowledge="The remainder is what is left after taking away the largest multiple of the "
                  "divisor.",
        right=f"The largest multiple of {k} not above {number} is {k * q}.",
        wrong=f"The largest multiple of {k} not above {number} is {k * wrong_q}.",
        fix=f"{k * wrong_q} is bigger than {number}, so it cannot be the multiple I want.",
        rest=[f"{k} times {q} is {k * q}.", f"{number} minus {k * q} leaves {r}."],
        test=f"Checking: {k} times {q} plus {r} is {number}.",
        answer=f"The remainder is {r}.")


def waiting(rng: random.Random) -> dict:
    patients, minutes = rng.randint(3, 9), rng.randint(5, 15)
    total = patients * minutes
    return dict(
        problem=f"At a clinic each visit takes {minutes} minutes and {patients} people are ahead "
                "of Sam in line. How long is Sam's wait before his visit starts?",
        q="how long Sam has to wait",
        knowledge="The wait is the number of people ahead times the length of each visit.",
        right=f"The wait is {patients} times {minutes} minutes.",
        wrong=f"The wait is {patients} plus {minutes}, which is {patients + minutes} minutes.",
        fix="each of the people ahead takes a full visit, so I should multiply.",
        rest=[f"{patients} times {minutes} is {total} minutes."],
        test=f"Checking with one person ahead: the wait would be {minutes} minutes, which fits.",
        answer=f"Sam waits {total} minutes.")


def knights(rng: random.Random) -> dict:
    a, b = rng.sample(["Ava", "Ben", "Cal", "Dee", "Eli", "Fay"], 2)
    return dict(
        problem=f"On an island, knights always tell the truth and knaves always lie. {a} says: "
                f"'{b} and I are both knaves.' What are {a} and {b}?",
        q=f"whether {a} and {b} are knights or knaves",
        knowledge="A knight's statement must be true and a knave's statement must be false.",
        right=f"If {a} were a knight, the statement would make {a} a knave, a contradiction.",
        wrong=f"If {a} is a knight, then both are knaves, so {a} is a knight and a knave.",
        fix=f"a knight cannot be a knave, so the case where {a} is a knight is impossible.",
        rest=[f"So {a} is a knave and the statement is false.",
              f"Since {a} is a knave, {b} must be a knight for the statement to be false."],
        test=f"Checking: {a} the knave says something false, and it is false that both are knaves.",
        answer=f"{a} is a knave and {b} is a knight.")


def dice(rng: random.Random) -> dict:
    target = rng.randint(3, 11)
    ways = 6 - abs(7 - target)
    return dict(
        problem=f"Two fair six-sided dice are rolled. What is the probability that the sum is "
                f"{target}?",
        q=f"the probability of rolling a sum of {target}",
        knowledge="Two dice have 36 equally likely outcomes.",
        right=f"The pairs that sum to {target} number {ways}.",
        wrong=f"The pairs that sum to {target} number {ways + 1}.",
        fix=f"listing them again, there are only {ways} ordered pairs.",
        rest=[f"So the probability is {ways} out of 36."],
        test=f"Checking one pair: {min(6, target - 1)} and {target - min(6, target - 1)} sum to "
             f"{target}.",
        answer=f"The probability is {ways}/36.")


def ages(rng: random.Random) -> dict:
    ann = rng.randint(5, 30)
    gap = rng.randint(2, 12)
    tom = ann + gap
    return dict(
        problem=f"Tom is {gap} years older than Ann. Together their ages add up to {ann + tom}. "
                "How old is Ann?",
        q="Ann's age",
        knowledge="Two unknowns with a sum and a difference can be solved by substitution.",
        right=f"If Ann is a years old, Tom is a + {gap}, so 2a + {gap} = {ann + tom}.",
        wrong=f"If Ann is a years old, Tom is a + {gap}, so a + {gap} = {ann + tom}.",
        fix="I dropped Ann's own age from the sum; both ages must be added.",
        rest=[f"So 2a = {2 * ann}.", f"That gives a = {ann}."],
        test=f"Checking: {ann} + {tom} = {ann + tom} and {tom} - {ann} = {gap}.",
        answer=f"Ann is {ann} years old.")


GENERATORS: list[Callable[[random.Random], dict]] = [
    shopping, speed, rectangle, discount, series, remainder, waiting, knights, dice, ages,
]


def _continue(reason: str, opener: str) -> str:
    """The reason's case after an opener ending in a comma or a full stop."""
    first, _, rest = reason.partition(" ")
    if opener.endswith(", ") and first in ("The", "That", "Each", "A", "Listing", "Speed"):
        return first.lower() + " " + rest
    return reason[0].upper() + reason[1:] if not opener.endswith(", ") else reason


def _steps(rng: random.Random, p: dict) -> list[Step]:
    """The chain as ordered (label, sentence) steps."""
    steps: list[Step] = [("initializing", rng.choice(_INIT).format(q=p["q"]))]
    if rng.random() < 0.7:
        steps.append(("adding-knowledge", p["knowledge"]))
    slips = 0 if rng.random() < 0.12 else (2 if rng.random() < 0.25 else 1)
    for index in range(slips):
        if index == 1:
            steps.append((None, rng.choice(_FILLER)))
        steps.append(("deduction", p["wrong"]))
        opener = _pick(rng, _BACKTRACK_OPENERS)
        reason = p["fix"] if rng.random() < 0.7 else rng.choice(_BACKTRACK_REASONS)
        steps.append(("backtracking", opener + _continue(reason, opener)))
    if slips == 0:
        steps.append(("deduction", p["right"]))
    if rng.random() < 0.4:
        steps.append(("uncertainty-estimation", rng.choice(_UNCERTAIN)))
    steps.extend(("deduction", sentence) for sentence in p["rest"])
    if rng.random() < 0.6:
        steps.append(("example-testing", p["test"]))
    if rng.random() < 0.3:
        steps.append((None, rng.choice(_FILLER)))
    steps.append(("deduction", p["answer"]))
    return steps


def _join(rng: random.Random, steps: list[Step]) -> list[str]:
    """Separators after each step: a space or a paragraph break."""
    return [" " if rng.random() < 0.6 else "\n\n" for _ in steps[:-1]] + [""]


def build_chain(rng: random.Random, index: int) -> dict:
    p = GENERATORS[index % len(GENERATORS)](rng)
    steps = _steps(rng, p)
    seps = _join(rng, steps)
    chain = "".join(text + sep for (_, text), sep in zip(steps, seps))
    drop = {rng.randrange(1, len(steps))} if rng.random() < 0.3 else set()
    respace = rng.random() < 0.2
    parts = []
    for i, ((label, text), sep) in enumerate(zip(steps, seps)):
        if i in drop:
            continue  # the annotator left this sentence out
        piece = text if label is None else f'["{label}"]{text}["end-section"]'
        parts.append(piece + (" " if respace and sep == "\n\n" else sep))
    return {"task_id": f"sample-{index:04d}", "problem": p["problem"],
            "reasoning_chain": chain, "annotated_chain": "".join(parts)}


def main() -> None:
    rng = random.Random(SEED)
    chains = [build_chain(rng, index) for index in range(N_CHAINS)]
    out = Path(__file__).with_name("sample_chains.json")
    out.write_text(json.dumps(chains, indent=1, ensure_ascii=False) + "\n")
    spans = sum(c["annotated_chain"].count('["backtracking"]') for c in chains)
    print(f"wrote {len(chains)} chains with {spans} backtracking spans to {out}")


if __name__ == "__main__":
    main()
