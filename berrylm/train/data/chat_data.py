"""Chat/SFT data generators, written as OpenAI `messages` JSONL (one {"messages": [...]} per line).

    calculator  arithmetic questions in many phrasings; the assistant calls the built-in calculator with a Python
                expression, the tool message holds the REAL calculator's output (model.calculator), and the
                final answer repeats that string exactly. Also multi-step (two calls, or parentheses), calculator
                errors (division by zero) and questions that need no tool.
    dictionary  "What does 'X' mean?" answered from WordNet glosses (needs `berry data fetch --sources wordnet`).
    dialogue    short casual conversations from chatterbot-corpus (needs `--sources dialogues`).
    persona     small talk in the assistant's own voice: greetings, who it is, what it can do, thanks
                (train/data/persona.py).
    text        plain {"text": ...} documents drawn from a built corpus's training split (`berry data build`),
                cut to TEXT_CHARS; SFT trains on all their tokens, which limits how much text ability it forgets.
dictionary, dialogue and text are drawn from corpora by corpus_chat.py; this file writes the rest.

`--heldout` writes an evaluation set instead: calculator questions whose phrasings (templates) never occur in
training (every HELDOUT_EVERY-th template per category is held out), as
{"messages": [system?, user], "expected": "84", "expression": "12*7", "template": "mul-3"}.
Everything is deterministic for a given seed.
"""

from __future__ import annotations

import json
import random
import zlib
from functools import cache
from pathlib import Path

from berrylm.train.data import calc_phrases as cp
from berrylm.train.data.calc_phrases import HELDOUT_EVERY
from berrylm.train.data.persona import persona_examples

SYSTEM_PROMPTS = [None, None, "You are Berry, a small helpful assistant.",
                  "You are a helpful assistant. Use the calculator for arithmetic.",
                  "You are Berry. Answer briefly and correctly."]
TOOLS_FRACTION = 0.25  # share of calculator conversations that also carry the OpenAI `tools` schema
SYM = {"+": "+", "-": "-", "*": "×", "/": "÷"}
OPS = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
CHAIN_ANSWERS = ["The result is {r}.", "First {r1}, then {r}. The answer is {r}.", "You get {r}."]

# kinds of calculator conversation and how often each is drawn; the held-out weights are fixed (they define the
# evaluation set), training leans on the compositional kinds ("f...") and the two-step ones
# (a kind appended with held-out weight 0 leaves the held-out draws, and so the evaluation set, unchanged)
KINDS = ["add", "sub", "mul", "div", "sym", "word", "paren", "chain", "zero", "none", "frame", "fchain", "fword",
         "flevel", "flink"]
HELDOUT_WEIGHTS = [12, 12, 12, 12, 12, 10, 8, 8, 0, 0, 60, 12, 0, 0, 0]
TRAIN_WEIGHTS = [10, 10, 10, 10, 10, 8, 8, 8, 4, 6, 60, 24, 16, 6, 16]

# --- question templates: {a} {b} {c} are operands, {s} the op symbol as typed (e.g. "*") ---
SIMPLE = {
    "+": ["What is {a} plus {b}?", "add {a} and {b}", "What's {a} + {b}?", "how much is {a} plus {b}",
          "Calculate the sum of {a} and {b}.", "{a} + {b} = ?", "What do you get if you add {b} to {a}?",
          "Please compute {a}+{b}", "sum of {a} and {b}?", "What is the total of {a} and {b}?",
          "If I add {a} and {b}, what do I get?", "{a} plus {b} equals what?"],
    "-": ["What is {a} minus {b}?", "how much is {a} minus {b}", "subtract {b} from {a}", "{a} - {b} = ?",
          "What's {a} take away {b}?", "Calculate {a} - {b}.", "What is the difference between {a} and {b}?",
          "compute {a}-{b}", "What do I get if I take {b} away from {a}?", "{a} minus {b}, please.",
          "Subtract {b} from {a}. What is left?", "What is {b} less than {a}?"],
    "*": ["What is {a} times {b}?", "{a}*{b}=?", "multiply {a} by {b}", "What's {a} × {b}?",
          "Calculate the product of {a} and {b}.", "how much is {a} multiplied by {b}", "compute {a} * {b}",
          "What is {a} x {b}?", "{a} times {b} is what?", "What do you get when you multiply {a} and {b}?",
          "Can you work out {a} * {b} for me?", "product of {a} and {b}?"],
    "/": ["What is {a} divided by {b}?", "compute {a} / {b}", "divide {a} by {b}", "{a}/{b}=?",
          "What's {a} ÷ {b}?", "how much is {a} divided by {b}", "Calculate {a} / {b}.",
          "What is the quotient of {a} and {b}?", "If I split {a} into {b} equal parts, how big is each part?",
          "{a} over {b} equals?", "How many times does {b} go into {a}?", "Please work out {a}/{b}."],
}
GENERIC = ["{a} {s} {b}", "calculate {a} {s} {b}", "What is {a} {s} {b}?", "Evaluate {a}{s}{b}.",
           "quick question: {a} {s} {b}?", "Solve {a} {s} {b}", "{a}{s}{b}", "Could you tell me {a} {s} {b}?"]
WORD = [  # (op, question, answer with {r})
    ("*", "I have {a} boxes of {b} eggs, how many eggs?", "You have {r} eggs."),
    ("*", "A classroom has {a} rows of {b} chairs. How many chairs are there?", "There are {r} chairs."),
    ("*", "Each ticket costs {b} dollars. How much do {a} tickets cost?", "{a} tickets cost {r} dollars."),
    ("+", "I had {a} marbles and found {b} more. How many marbles do I have now?", "You have {r} marbles now."),
    ("+", "A train carries {a} passengers and {b} more get on. How many are on the train?",
     "There are {r} passengers on the train."),
    ("+", "I walked {a} meters in the morning and {b} meters in the evening. How far did I walk?",
     "You walked {r} meters."),
    ("-", "A shop had {a} apples and sold {b}. How many are left?", "The shop has {r} apples left."),
    ("-", "My book has {a} pages and I have read {b}. How many pages are left?", "You have {r} pages left."),
    ("-", "The temperature was {a} degrees and dropped by {b}. What is it now?", "It is now {r} degrees."),
    ("/", "Split {a} dollars evenly among {b} people. How much does each get?", "Each person gets {r} dollars."),
    ("/", "{a} cookies are shared equally by {b} children. How many does each child get?",
     "Each child gets {r} cookies."),
    ("/", "A rope of {a} cm is cut into {b} equal pieces. How long is each piece?", "Each piece is {r} cm long."),
]
PAREN = [  # (expression, question)
    ("({a}+{b})*{c}", "What is ({a} + {b}) times {c}?"), ("{a}*{b}+{c}", "What is {a} times {b} plus {c}?"),
    ("({a}-{b})*{c}", "compute ({a} - {b}) * {c}"), ("{a}+{b}+{c}", "add {a}, {b} and {c}"),
    ("({a}+{b})/{c}", "What is the sum of {a} and {b}, divided by {c}?"), ("{a}*{b}*{c}", "{a}*{b}*{c}=?"),
    ("{a}-{b}-{c}", "Take {b} and then {c} away from {a}."),
    ("({a}+{b}+{c})/3", "What is the average of {a}, {b} and {c}?"),
]
CHAIN = [  # (first expression, second with {r}, question)
    ("{a}+{b}", "{r}*{c}", "Add {a} and {b}, then multiply the result by {c}."),
    ("{a}*{b}", "{r}-{c}", "Multiply {a} by {b} and then subtract {c}."),
    ("{a}-{b}", "{r}/{c}", "First subtract {b} from {a}, then divide that by {c}."),
    ("{a}*{b}", "{r}+{c}", "What is {a} times {b}? Then add {c} to it."),
    ("{a}+{b}", "{r}+{c}", "Start with {a}, add {b}, then add {c}. What do you get?"),
    ("{a}/{b}", "{r}*{c}", "Divide {a} by {b} and multiply the answer by {c}."),
]
DIV_ZERO = [("What is {a} divided by 0?", "{a}/0"), ("compute {a} / 0", "{a}/0"), ("{a}/0=?", "{a}/0"),
            ("divide {a} by zero", "{a}/0"), ("What is {a} / ({b} - {b})?", "{a}/({b}-{b})")]
# no answer is the bare result: "{a} + {b} = {r}." opens with the first operand, so a bare "{r}" left the first
# answer token torn between the two numbers, and a small model then repeated the operand ("544+9" -> "544").
# (The held-out set draws an answer too: a list keeps its length so that the set stays the same.)
ANSWERS = ["{a} {sym} {b} = {r}.", "The answer is {r}.", "The calculator gives {r}.", "It's {r}.",
           "That comes to {r}.", "{a} {sym} {b} is {r}.", "The result is {r}."]
FRAME_ANSWERS = ["The answer is {r}.", "The calculator gives {r}.", "It's {r}.", "That comes to {r}.",
                 "The result is {r}.", "{e} = {r}."]
NO_TOOL = [  # questions that need no calculator (some mention numbers)
    ("Hi there!", "Hello! How can I help you today?"),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many days are in a week?", "A week has 7 days."),
    ("How many legs does a spider have?", "A spider has 8 legs."),
    ("What color is the sky on a clear day?", "On a clear day the sky is blue."),
    ("Who wrote Hamlet?", "Hamlet was written by William Shakespeare."),
    ("What is your name?", "My name is Berry, a small language model."),
    ("Can you tell me a joke?", "Why did the scarecrow win an award? Because he was outstanding in his field."),
    ("What is water made of?", "Water is made of hydrogen and oxygen: two hydrogen atoms and one oxygen atom."),
    ("How many months are in a year?", "A year has 12 months."), ("Thank you!", "You're welcome!"),
    ("What does a calculator do?", "A calculator does arithmetic: adding, subtracting, multiplying and dividing."),
    ("Is 7 a prime number?", "Yes, 7 is a prime number: it is divisible only by 1 and itself."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("Which planet is closest to the sun?", "Mercury is the planet closest to the sun."),
    ("What do bees make?", "Bees make honey and beeswax."), ("Good morning!", "Good morning! What can I do for you?"),
    ("How many sides does a triangle have?", "A triangle has 3 sides."),
    ("What language is spoken in Spain?", "The main language of Spain is Spanish."),
    ("Who are you?", "I am Berry, a small assistant. I can answer questions and do arithmetic with a calculator."),
]


def _tool_result(expr: str) -> tuple[bool, str]:
    """The real calculator's answer: (ok, content). Errors read "error: <message>"."""
    from berrylm.model.calculator import CalcError, calculate

    try:
        return True, calculate(expr)
    except CalcError as e:
        return False, f"error: {e}"


def _num(rng: random.Random, max_digits: int = 5) -> int:
    digits = rng.choices(range(1, max_digits + 1), weights=[4, 4, 3, 2, 1][:max_digits])[0]
    return rng.randint(1 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


def _operands(rng: random.Random, op: str, max_digits: int = 5) -> tuple[int, int]:
    if op == "/" and rng.random() < 0.7:  # mostly exact quotients
        b, q = _num(rng, 3), _num(rng, 3)
        if b * q < 100000:
            return b * q, b
    return _num(rng, max_digits), _num(rng, max_digits)


@cache
def templates(heldout: bool) -> dict[str, list[tuple[str, object]]]:
    """Question templates by category, each as (template id, template); train and heldout are disjoint."""
    pools = {f"{k}": v for k, v in [("add", SIMPLE["+"]), ("sub", SIMPLE["-"]), ("mul", SIMPLE["*"]),
                                    ("div", SIMPLE["/"]), ("sym", GENERIC), ("word", WORD), ("paren", PAREN),
                                    ("chain", CHAIN)]}
    pick = (lambda i: i % HELDOUT_EVERY == HELDOUT_EVERY - 1) if heldout else \
        (lambda i: i % HELDOUT_EVERY != HELDOUT_EVERY - 1)
    out = {k: [(f"{k}-{i}", t) for i, t in enumerate(v) if pick(i)] for k, v in pools.items()}
    if heldout:  # "What's {a} + {b}?" is "What is {a} {s} {b}?" with s = "+": such a template is not unseen
        seen = cp.phrasings([question_of(t) for v in templates(False).values() for _, t in v])
        out = {k: [it for it in v if not cp.seen_in(question_of(it[1]), seen)] for k, v in out.items()}
    return out


def question_of(template: str | tuple) -> str:
    """The question text of a fixed template (a string, or the question inside a WORD/PAREN/CHAIN tuple)."""
    if isinstance(template, str):
        return template
    return template[1] if template[0] in SYM else template[-1]


def _call(i: int, expr: str) -> dict:
    return {"id": f"call_{i}", "type": "function",
            "function": {"name": "calculator", "arguments": json.dumps({"expression": expr})}}


def calculator_example(rng: random.Random, heldout: bool = False, weights: list[float] | None = None) -> dict:
    """One conversation (train) or one eval record (heldout); weights (per KINDS) replace TRAIN_WEIGHTS."""
    pools = templates(heldout)
    kind = rng.choices(KINDS, weights=HELDOUT_WEIGHTS if heldout else weights or TRAIN_WEIGHTS)[0]
    system = rng.choice(SYSTEM_PROMPTS)
    head = [{"role": "system", "content": system}] if system else []
    if kind == "none":
        q, a = rng.choice(NO_TOOL)
        return {"messages": head + [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    if kind == "zero":
        a, b = _num(rng), _num(rng)
        qt, et = rng.choice(DIV_ZERO)
        q, expr = qt.format(a=a, b=b), et.format(a=a, b=b)
        ok, res = _tool_result(expr)
        if ok:
            raise RuntimeError(f"calculator did not refuse {expr!r}")
        final = f"The calculator returned an {res}. Division by zero is undefined, so there is no numeric answer."
        return _conversation(head, q, [(expr, res)], final)
    if kind.startswith("f"):
        return _frame_example(rng, kind, head, heldout)
    tid, tpl = rng.choice(pools[kind])
    if kind in ("add", "sub", "mul", "div", "sym"):
        op = OPS.get(kind) or rng.choice("+-*/")
        a, b = _operands(rng, op)
        sym = rng.choice(["*", "x", "×"]) if op == "*" else rng.choice(["/", "÷"]) if op == "/" else op
        q = tpl.format(a=a, b=b, s=sym)
        expr = f"{a}{op}{b}"
        ok, r = _tool_result(expr)
        final = rng.choice(ANSWERS).format(a=a, b=b, sym=SYM[op], r=r)
        steps = [(expr, r)]
    elif kind == "word":
        op, qt, at = tpl
        a, b = (max(2, x) for x in _operands(rng, op, max_digits=3))
        if op == "-" and a < b and "temperature" not in qt:
            a, b = b, a
        q, expr = qt.format(a=a, b=b), f"{a}{op}{b}"
        ok, r = _tool_result(expr)
        final = at.format(a=a, b=b, r=r)
        steps = [(expr, r)]
    elif kind == "paren":
        et, qt = tpl
        a, b, c = _num(rng, 3), _num(rng, 3), _num(rng, 2)
        q, expr = qt.format(a=a, b=b, c=c), et.format(a=a, b=b, c=c)
        ok, r = _tool_result(expr)
        final = rng.choice(["The answer is {r}.", "{e} = {r}.", "It comes to {r}."]).format(e=expr, r=r)
        steps = [(expr, r)]
    else:  # chain: two calls, the second uses the first result exactly as returned
        e1, e2, qt = tpl
        a, b, c = _num(rng, 3), _num(rng, 3), _num(rng, 2)
        q = qt.format(a=a, b=b, c=c)
        ok, steps = _two_calls(e1, e2, a, b, c)
        final = rng.choice(CHAIN_ANSWERS).format(r=steps[1][1], r1=steps[0][1])
    return _record(rng, head, q, ok, steps, final, tid, heldout)


def _two_calls(e1: str, e2: str, a: int, b: int, c: int) -> tuple[bool, list[tuple[str, str]]]:
    """A chain: the second expression uses the first result exactly as the calculator returned it."""
    ok1, r1 = _tool_result(e1.format(a=a, b=b))
    expr = e2.format(r=r1, c=c)
    ok2, r = _tool_result(expr)
    return ok1 and ok2, [(e1.format(a=a, b=b), r1), (expr, r)]


def _record(rng: random.Random, head: list[dict], q: str, ok: bool, steps: list[tuple[str, str]], final: str,
            tid: str, heldout: bool) -> dict:
    """The conversation (train) or the eval record (heldout) for a question and its calculator steps."""
    if not ok:
        raise RuntimeError(f"calculator refused {[s[0] for s in steps]}: {steps[-1][1]}")
    if heldout:
        return {"messages": head + [{"role": "user", "content": q}], "expected": steps[-1][1],
                "expression": steps[0][0] if len(steps) == 1 else [s[0] for s in steps], "template": tid}
    return _conversation(head, q, steps, final, tools=rng.random() < TOOLS_FRACTION)


@cache
def _frame_skeletons(heldout: bool) -> tuple[list, list]:
    """Compositional (frame x phrase) skeletons, single-call and chains; no training one equals (normalised) a
    held-out one, fixed or compositional."""
    def fixed(side: bool) -> list[str]:
        return [question_of(t) for v in templates(side).values() for _, t in v]

    if heldout:  # drop held-out skeletons that match anything training could contain
        seen = fixed(False) + [t[2] for t in cp.skeletons(False) + cp.chain_skeletons(False)]
        return cp.drop_seen(cp.skeletons(True), seen), cp.drop_seen(cp.chain_skeletons(True), seen)
    held = _every_heldout_question()
    return cp.drop_seen(cp.skeletons(False), held), cp.drop_seen(cp.chain_skeletons(False), held)


@cache
def _every_heldout_question() -> list[str]:
    """Every question template on the held-out side before any is dropped, fixed and compositional: what a
    training template must not equal."""
    return [question_of(t) for v in templates(True).values() for _, t in v] + \
        [t[2] for t in cp.skeletons(True) + cp.chain_skeletons(True)]


@cache
def _linked_chains() -> list[tuple]:
    """Training-only chains whose second step is a sentence of its own (calc_phrases.linked_chain_skeletons),
    less any that match a held-out question."""
    return cp.drop_seen(cp.linked_chain_skeletons(), _every_heldout_question())


@cache
def _heldout_forms() -> set[str]:
    """Normalised forms of every held-out question template, fixed and compositional."""
    single, chain = _frame_skeletons(True)
    return cp.phrasings([question_of(t) for v in templates(True).values() for _, t in v] +
                        [t[2] for t in single + chain])


def _frame_example(rng: random.Random, kind: str, head: list[dict], heldout: bool) -> dict:
    """A compositional question (train/data/calc_phrases.py): one call, two calls (fchain) or a word problem (fword)."""
    single, chain = _frame_skeletons(heldout)
    # a and b are redrawn below; the draws stay so that a seed still gives the data berry-chat was trained on
    a, b, c = _num(rng, 4), _num(rng, 4), _num(rng, 2)
    if kind in ("fword", "flevel"):
        op, qt, at = cp.word_problem(rng, cp.WORD_FRAMES if kind == "fword" else cp.LEVEL_FRAMES)
        a, b = (max(2, x) for x in _operands(rng, op, max_digits=3))
        if op == "-" and a < b and kind == "fword":
            a, b = b, a
        q, expr = qt.format(a=a, b=b), f"{a}{op}{b}"
        ok, r = _tool_result(expr)
        steps, final, tid = [(expr, r)], at.format(r=r), "frame-word"
    elif kind in ("fchain", "flink"):
        e1, e2, qt = rng.choice(chain if kind == "fchain" else _linked_chains())
        a, b = _num(rng, 3), _num(rng, 3)
        q = qt.format(a=a, b=b, c=c)
        ok, steps = _two_calls(e1, e2, a, b, c)
        final, tid = rng.choice(CHAIN_ANSWERS).format(r=steps[1][1], r1=steps[0][1]), "frame-chain"
    else:
        cat, et, qt = rng.choice(single)
        if not heldout:
            loose = cp.loosen(qt, rng)
            qt = qt if cp.seen_in(loose, _heldout_forms()) else loose
        a, b = _operands(rng, OPS[cat]) if cat in OPS else (_num(rng, 3), _num(rng, 3))
        q, expr = qt.format(a=a, b=b, c=c), et.format(a=a, b=b, c=c)
        ok, r = _tool_result(expr)
        steps, tid = [(expr, r)], f"frame-{cat}"
        final = rng.choice(FRAME_ANSWERS).format(e=expr, r=r)
    return _record(rng, head, q, ok, steps, final, tid, heldout)


def _conversation(head: list[dict], question: str, steps: list[tuple[str, str]], final: str,
                  tools: bool = False) -> dict:
    msgs = head + [{"role": "user", "content": question}]
    for i, (expr, result) in enumerate(steps):
        msgs.append({"role": "assistant", "content": "", "tool_calls": [_call(i, expr)]})
        msgs.append({"role": "tool", "tool_call_id": f"call_{i}", "content": result})
    msgs.append({"role": "assistant", "content": final})
    if not tools:
        return {"messages": msgs}
    from berrylm.model.toolcall import CALCULATOR_TOOL

    return {"messages": msgs, "tools": [CALCULATOR_TOOL]}


def parse_weights(spec: str) -> list[float]:
    """"fchain=48,word=16" -> TRAIN_WEIGHTS with those kinds' weights replaced."""
    w = dict(zip(KINDS, TRAIN_WEIGHTS))
    for item in filter(None, (x.strip() for x in spec.split(","))):
        k, _, v = item.partition("=")
        if k not in w:
            raise ValueError(f"--weights: unknown calculator kind '{k}' (known: {', '.join(KINDS)})")
        try:
            w[k] = float(v)
        except ValueError:
            raise ValueError(f"--weights: '{item}' is not KIND=NUMBER") from None
        if w[k] < 0:
            raise ValueError(f"--weights: '{item}' is negative")
    if not any(w.values()):
        raise ValueError("--weights: every kind has weight 0")
    return [w[k] for k in KINDS]


def generate(kind: str, n: int, seed: int = 0, heldout: bool = False, cache: str | Path = "data/raw",
             weights: str = "", corpus: str | Path = "data/corpus") -> list[dict]:
    rng = random.Random(seed * 1000003 + zlib.crc32(kind.encode()))
    if heldout and kind != "calculator":
        raise ValueError("--heldout is only defined for --kind calculator")
    if heldout and weights:
        raise ValueError("--weights changes the training mix; the held-out set's mix is fixed")
    if kind == "calculator":
        w = parse_weights(weights) if weights else None
        return [calculator_example(rng, heldout, w) for _ in range(n)]
    from berrylm.train.data.corpus_chat import dialogue_examples, dictionary_examples, text_examples

    if kind == "dictionary":
        return dictionary_examples(cache, n, rng)
    if kind == "dialogue":
        return dialogue_examples(cache, n, rng)
    if kind == "persona":
        return persona_examples(n, rng)
    if kind == "text":
        return text_examples(corpus, n, rng)
    raise ValueError(f"unknown chat data kind '{kind}' (choose from calculator, dictionary, dialogue, persona, text)")


def write_chat_data(kinds: list[str], n: int, out: str | Path, heldout: bool = False, cache: str | Path = "data/raw",
                    seed: int = 0, weights: str = "", corpus: str | Path = "data/corpus") -> dict[str, int]:
    """Generate n records per kind, shuffle them together (seeded) and write JSONL; returns counts per kind."""
    records, counts = [], {}
    for kind in kinds:
        recs = generate(kind, n, seed, heldout, cache, weights, corpus)
        records += recs
        counts[kind] = len(recs)
    random.Random(seed).shuffle(records)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return counts
