"""Compositional calculator questions: a sentence frame wrapped around an operation phrase.

The fixed templates in chat_data.py teach whole sentences; a 1.8M model then ties the operation to the carrier
words ("work out" -> multiply) instead of to the operation's own words. Here every operation phrase appears in
many frames, so what decides the expression is the phrase ("the quotient of", "less than", "+").

    question = frame(phrase(a, b[, c]))        e.g. "Could you tell me {x}?" + "the product of {a} and {b}"
    expression = the phrase's Python form        "{a}*{b}"

Frames are split train/held-out the same way as the fixed templates (every HELDOUT_EVERY-th is held out), so a
held-out question always has a sentence frame the model never saw; the operation phrases are shared (they are the
vocabulary of arithmetic, which no model can guess). chat_data drops, with `drop_seen`, every training skeleton
that (ignoring case, spacing and punctuation) equals a held-out one, and every held-out skeleton that equals any
training one, fixed or compositional.
"""

from __future__ import annotations

import random
import re

# noun phrases: fit "What is {x}?"; (python expression, phrase)
NOUN = {
    "add": [("{a}+{b}", p) for p in [
        "{a} plus {b}", "{a} + {b}", "{a}+{b}", "the sum of {a} and {b}", "the total of {a} and {b}",
        "{b} added to {a}", "{a} and {b} added together", "{b} more than {a}", "{a} increased by {b}",
        "{a} and {b} combined"]],
    "sub": [("{a}-{b}", p) for p in [
        "{a} minus {b}", "{a} - {b}", "{a}-{b}", "the difference between {a} and {b}", "{a} take away {b}",
        "{b} subtracted from {a}", "{b} less than {a}", "{a} decreased by {b}", "{a} reduced by {b}",
        "{a} less {b}", "{a} with {b} taken away"]],
    "mul": [("{a}*{b}", p) for p in [
        "{a} times {b}", "{a} * {b}", "{a}*{b}", "{a} x {b}", "{a} × {b}", "the product of {a} and {b}",
        "{a} multiplied by {b}", "{a} lots of {b}", "{a} groups of {b}", "{a} multiplied with {b}"]],
    "div": [("{a}/{b}", p) for p in [
        "{a} divided by {b}", "{a} / {b}", "{a}/{b}", "{a} ÷ {b}", "the quotient of {a} and {b}",
        "{a} over {b}", "{a} split into {b} equal parts", "the ratio of {a} to {b}", "{a} shared equally by {b}",
        "{a} divided into {b} equal groups", "{a} into {b} equal shares"]],
    "multi": [
        ("{a}+{b}+{c}", "{a} plus {b} plus {c}"), ("{a}+{b}+{c}", "the sum of {a}, {b} and {c}"),
        ("{a}+{b}+{c}", "{a} + {b} + {c}"), ("{a}+{b}+{c}", "the total of {a}, {b} and {c}"),
        ("{a}+{b}+{c}", "{a}, {b} and {c} added together"), ("{a}*{b}*{c}", "{a} times {b} times {c}"),
        ("{a}*{b}*{c}", "the product of {a}, {b} and {c}"), ("{a}-{b}-{c}", "{a} minus {b} minus {c}"),
        ("{a}*{b}+{c}", "{a} times {b} plus {c}"), ("{a}+{b}*{c}", "{a} plus {b} times {c}"),
        ("{a}*{b}-{c}", "{a} times {b} minus {c}"), ("{a}+{b}-{c}", "{a} plus {b} minus {c}"),
        ("{a}-{b}+{c}", "{a} minus {b} plus {c}"), ("{a}/{b}+{c}", "{a} divided by {b} plus {c}"),
        ("({a}+{b})*{c}", "({a} + {b}) * {c}"), ("({a}+{b})*{c}", "the sum of {a} and {b}, times {c}"),
        ("({a}-{b})*{c}", "({a} - {b}) × {c}"), ("({a}+{b})/{c}", "the sum of {a} and {b}, divided by {c}"),
        ("({a}+{b})/{c}", "({a}+{b})/{c}"), ("({a}+{b}+{c})/3", "the average of {a}, {b} and {c}"),
        ("({a}+{b}+{c})/3", "the mean of {a}, {b} and {c}"), ("({a}+{b})/2", "the average of {a} and {b}"),
        ("{a}*{b}*{c}", "{a} x {b} x {c}"), ("{a}+{b}+{c}", "{a}+{b}+{c}")],
}
# verb phrases: fit "Please {v}."
VERB = {
    "add": [("{a}+{b}", p) for p in ["add {a} and {b}", "add {b} to {a}", "add up {a} and {b}", "sum {a} and {b}",
                                     "combine {a} and {b}", "find the sum of {a} and {b}"]],
    "sub": [("{a}-{b}", p) for p in ["subtract {b} from {a}", "take {b} away from {a}", "take away {b} from {a}",
                                     "deduct {b} from {a}", "remove {b} from {a}", "find {a} minus {b}"]],
    "mul": [("{a}*{b}", p) for p in ["multiply {a} by {b}", "multiply {a} and {b}", "multiply {a} with {b}",
                                     "times {a} by {b}", "find the product of {a} and {b}"]],
    "div": [("{a}/{b}", p) for p in ["divide {a} by {b}", "split {a} into {b} equal parts",
                                     "share {a} equally among {b}", "divide {a} into {b} equal parts",
                                     "find the quotient of {a} and {b}"]],
    "multi": [("{a}+{b}+{c}", "add {a}, {b} and {c}"), ("{a}+{b}+{c}", "add up {a}, {b} and {c}"),
              ("{a}+{b}+{c}", "sum {a}, {b} and {c}"), ("{a}*{b}*{c}", "multiply {a}, {b} and {c}"),
              ("{a}-{b}-{c}", "subtract {b} and {c} from {a}"), ("({a}+{b}+{c})/3", "average {a}, {b} and {c}"),
              ("({a}+{b})*{c}", "add {a} and {b} and multiply the sum by {c}"),
              ("{a}-{b}-{c}", "take {b} and {c} away from {a}")],
}
NOUN_FRAMES = [
    "What is {x}?", "Calculate {x}.", "Please work out {x}.", "Can you tell me {x}?", "{x} = ?",
    "{x} equals what?", "How much is {x}?", "Find {x}.", "Evaluate {x}.", "I need {x}.", "Tell me {x}.", "{x}?",
    "quick question: what is {x}?", "Solve {x}.", "Do you know {x}?", "Give me {x}.", "What does {x} come to?",
    "What does {x} equal?", "what is {x}", "Work out {x} for me.", "Hey, what's {x}?", "I want to know {x}.",
    "Figure out {x}.", "Can you compute {x}?", "Determine {x}.", "What would {x} be?", "Help me find {x}.",
    "please calculate {x}", "So what is {x}?", "Answer this: {x}", "Use the calculator: {x}",
    "What number is {x}?", "{x}", "Could you calculate {x} for me?", "I'd like to know {x}.", "what's {x}?",
    "Compute {x}, please.", "Tell me what {x} is.", "How big is {x}?", "Can you find {x}?"]
TRAIN_NOUN_FRAMES = [  # training only (never held out): questions that open with the operation
    "{x}, please.", "{x}: what is it?", "{x} is how much?", "{x}. What is the answer?", "{x}, what do you get?",
    "{x} comes to what?", "{x} would be?", "{x}, how much is that?", "{x} - can you work it out?",
    "{x}. Calculate it."]
VERB_FRAMES = [
    "{v}", "Please {v}.", "Can you {v}?", "Could you {v} for me?", "I want you to {v}.", "{V}, please.",
    "Help me {v}.", "What do I get if I {v}?", "What do you get when you {v}?", "If I {v}, what is the result?",
    "Try to {v}.", "Go ahead and {v}.", "Would you {v}?", "{V} and tell me the answer.", "Let's {v}.",
    "{V}. What is the result?", "Please {v} for me.", "I need you to {v}.", "What happens if you {v}?",
    "Can you quickly {v}?"]
THEN = {"+": ["add {c}", "add {c} to the result", "add {c} to it", "plus {c}"],
        "-": ["subtract {c}", "take away {c}", "subtract {c} from the result", "minus {c}"],
        "*": ["multiply by {c}", "multiply the result by {c}", "times {c}", "multiply that by {c}"],
        "/": ["divide by {c}", "divide the result by {c}", "divide that by {c}", "divide it by {c}"]}
TRAIN_VERB_FRAMES = [  # training only: a lead-in joined by "and" to the one operation (no second step)
    "Sit down and {v}.", "Take a moment and {v}.", "Be so kind and {v}.", "Try and {v}.", "Come on and {v}.",
    "Stop for a second and {v}.", "Be a star and {v}.", "Grab a pencil and {v}."]
CHAIN_FRAMES = [  # {v}: first step as a verb phrase, {x}: as a noun phrase, {t}: the second step
    "{V}, then {t}.", "First {v}, then {t}.", "{V} and then {t}.", "What is {x}? Then {t}.",
    "Take {x} and {t}.", "Start with {x}, then {t}.", "{V}. Then {t}. What do you get?", "Compute {x}, then {t}.",
    "Find {x} and {t}.", "{V}; after that, {t}.", "Work out {x}, and then {t}.", "What do I get if I {v} and {t}?"]
TRAIN_CHAIN_FRAMES = [  # training only: a complete first question, the second step in a sentence of its own
    "How much is {x}? Next, {t}.", "Calculate {x}. After that, {t}.", "Find {x}. Now {t}.",
    "Can you tell me {x}? After that, {t}.", "Give me {x}. Next {t}.", "{V}. Now {t}.",
    "Tell me {x}. And then {t}.", "{x}? Next, {t}.", "What does {x} come to? Now {t}.", "{V}. Next, {t}.",
    "Work out {x}. After that {t}, please.", "Please {v}. Then, once you have it, {t}."]
CHAIN_LINKS = [  # training only: the second step as a sentence of its own after any whole first question
    "Then {t}.", "Next, {t}.", "After that, {t}.", "Now {t}.", "And then {t}.", "Then {t}, please.",
    "Once you have that, {t}.", "Finally, {t}.", "With that result, {t}.", "Then {t} and tell me the result."]
NAMES = ["Sam", "Ana", "Lee", "Maya", "Tom", "Priya", "Omar", "Kate", "Ben", "Lina"]
THINGS = ["apples", "books", "coins", "stickers", "cards", "pencils", "stamps", "shells", "tickets", "cookies"]
WORD_FRAMES = {  # (op, question, answer with {r}); {n} a name, {t} a plural noun
    "+": [("{n} has {a} {t} and gets {b} more. How many {t} does {n} have now?", "{n} has {r} {t} now."),
          ("There are {a} {t} in one box and {b} in another. How many {t} in total?", "There are {r} {t}."),
          ("{n} collected {a} {t} on Monday and {b} on Tuesday. How many altogether?",
           "{n} collected {r} {t} altogether."),
          ("{n} had {a} {t} and bought {b} more. How many {t} does {n} have now?", "{n} has {r} {t} now."),
          ("{n} had {a} {t}, then was given {b} more. How many does {n} have now?", "{n} has {r} {t} now."),
          ("{n} had {a} {t} and won {b} more at the fair. How many {t} now?", "{n} has {r} {t} now."),
          ("{n} had {a} {t} and picked up {b} more. How many {t} does {n} have?", "{n} has {r} {t}."),
          ("I have {a} {t} and {n} gives me {b} more. How many {t} do I have now?", "You have {r} {t} now."),
          ("I had {a} {t}, and then I got {b} more. How many do I have?", "You have {r} {t}."),
          ("A path is {a} meters long and {b} meters are added to it. How long is it now?",
           "It is {r} meters long now.")],
    "-": [("{n} had {a} {t} and gave away {b}. How many are left?", "{n} has {r} {t} left."),
          ("A store had {a} {t} and sold {b} of them. How many remain?", "{r} {t} remain."),
          ("{n} needs {a} {t} and already has {b}. How many more are needed?", "{n} needs {r} more {t}."),
          ("{n} has {a} {t} and loses {b} of them. How many {t} does {n} have now?", "{n} has {r} {t} now."),
          ("There are {a} {t} in a jar and {n} takes out {b}. How many {t} are still in the jar?",
           "There are {r} {t} in the jar."),
          ("{n} has {a} {t} and uses up {b}. How many {t} remain?", "{r} {t} remain."),
          ("A box holds {a} {t}. {n} has already taken {b}. How many {t} are left in the box?",
           "There are {r} {t} left in the box."),
          ("{n} had {a} {t} but lost {b} on the way home. How many {t} does {n} still have?",
           "{n} still has {r} {t}."),
          ("{n} wants {a} {t} and has collected {b} so far. How many more does {n} need?",
           "{n} needs {r} more {t}."),
          ("{n} has {a} {t} to sort and has sorted {b}. How many are left to sort?", "{r} {t} are left."),
          ("A puzzle has {a} pieces and {n} has placed {b}. How many pieces are left?", "{r} pieces are left."),
          ("{n} has to deliver {a} {t} and has delivered {b}. How many are left?", "{r} {t} are left."),
          ("A list has {a} tasks and {n} has finished {b}. How many tasks are left?", "{r} tasks are left."),
          ("I had {a} {t} and I gave {b} to {n}. How many {t} do I have left?", "You have {r} {t} left."),
          ("I have {a} {t} and I have already used {b}. How many {t} are left?", "{r} {t} are left."),
          ("My bag had {a} {t}. I took out {b}. How many {t} are left in my bag?",
           "There are {r} {t} left in your bag."),
          ("We have {a} {t} and we have used {b} so far. How many {t} are left?", "{r} {t} are left."),
          ("I have {a} {t} to count and I have counted {b}. How many are left to count?", "{r} {t} are left."),
          ("I must write {a} words and I have written {b}. How many words are left?", "{r} words are left."),
          ("The album has {a} {t} and {n} has looked at {b}. How many {t} are left?", "{r} {t} are left."),
          ("The film is {a} minutes long and we have watched {b}. How many minutes are left?",
           "{r} minutes are left."),
          ("The road is {a} km long and I have driven {b} km. How many km are left?", "{r} km are left.")],
    "*": [("{n} buys {a} packs with {b} {t} in each. How many {t} is that?", "That is {r} {t}."),
          ("There are {a} shelves with {b} {t} on each shelf. How many {t} are there?", "There are {r} {t}."),
          ("Each of {a} kids has {b} {t}. How many {t} do they have together?", "Together they have {r} {t}."),
          ("{n} runs {b} km a day for {a} days. How far is that in all?", "That is {r} km.")],
    "/": [("{n} shares {a} {t} equally among {b} friends. How many does each friend get?",
           "Each friend gets {r} {t}."),
          ("{a} {t} are packed into {b} equal boxes. How many {t} go in each box?", "Each box holds {r} {t}."),
          ("{n} splits {a} {t} into {b} equal piles. How big is each pile?", "Each pile has {r} {t}."),
          ("{n} has {a} meters of string and cuts it into {b} equal parts. How long is each part?",
           "Each part is {r} meters long."),
          ("A {a} km trip is split into {b} equal stages. How long is each stage?", "Each stage is {r} km."),
          ("{n} pours {a} ml of juice equally into {b} cups. How much is in each cup?", "Each cup has {r} ml.")],
}
LEVEL_FRAMES = {  # training-only word problems about a level that rises or falls (the result may go negative)
    "+": [("{n}'s score was {a} points and went up by {b}. What is the score now?", "The score is now {r} points."),
          ("The water level was {a} cm and rose by {b} cm. How high is it now?", "It is now {r} cm."),
          ("A bank balance of {a} dollars increased by {b} dollars. What is the balance?",
           "The balance is {r} dollars.")],
    "-": [("{n}'s score was {a} points and fell by {b}. What is the score now?", "The score is now {r} points."),
          ("The water level was {a} cm and went down by {b} cm. How high is it now?", "It is now {r} cm."),
          ("A bank balance of {a} dollars dropped by {b} dollars. What is the balance?",
           "The balance is {r} dollars."),
          ("The price was {a} cents, then it fell by {b} cents. What is the price now?", "The price is {r} cents."),
          ("A plane flying at {a} meters descends by {b} meters. What is its height now?", "It is at {r} meters."),
          ("It was {a} degrees at noon and it got {b} degrees colder by night. How warm is it at night?",
           "It is {r} degrees at night.")],
}
HELDOUT_EVERY = 4  # item i is held out when i % HELDOUT_EVERY == HELDOUT_EVERY - 1 (frames and fixed templates)


def _split(items: list, heldout: bool) -> list:
    return [t for i, t in enumerate(items) if (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) == heldout]


def normalise(skeleton: str) -> list[str]:
    """Comparable forms of a question template: lower case, "what's" = "what is", no spaces or punctuation;
    a fixed template's "{s}" (the operator as typed) stands for each operator symbol."""
    s = re.sub(r"[^a-z{}+\-*/×÷0-9]+", "", skeleton.lower().replace("what's", "what is"))
    return [s.replace("{s}", op) for op in "+-*x×/÷"] if "{s}" in s else [s]


def _cap(s: str) -> str:
    return s[0].upper() + s[1:] if s else s


def _fill(frame: str, x: str = "", v: str = "", t: str = "") -> str:
    return frame.format(x=x, v=v, V=_cap(v), t=t)


def skeletons(heldout: bool) -> list[tuple[str, str, str]]:
    """Every (category, expression template, question template) for one side of the split."""
    out = []
    for cat in NOUN:
        for expr, p in NOUN[cat]:
            frames = _split(NOUN_FRAMES, heldout) + ([] if heldout else TRAIN_NOUN_FRAMES)
            out += [(cat, expr, _fill(f, x=p)) for f in frames]
        for expr, p in VERB[cat]:
            frames = _split(VERB_FRAMES, heldout) + ([] if heldout else TRAIN_VERB_FRAMES)
            out += [(cat, expr, _fill(f, v=p)) for f in frames]
    return out


def phrasings(questions: list[str]) -> set[str]:
    """The normalised forms of question templates, to test others against with `seen_in`."""
    return {n for q in questions for n in normalise(q)}


def seen_in(question: str, forms: set[str]) -> bool:
    return not forms.isdisjoint(normalise(question))


def drop_seen(items: list[tuple], seen: list[str]) -> list[tuple]:
    """items whose question template (item[2]) matches none of `seen` once normalised."""
    forms = phrasings(seen)
    return [it for it in items if not seen_in(it[2], forms)]


def chain_skeletons(heldout: bool) -> list[tuple[str, str, str]]:
    """(first expression, second expression with {r}, question template) for two-call questions, the shape of
    chat_data.CHAIN."""
    frames = _split(CHAIN_FRAMES, heldout)
    if not heldout:  # + every training verb frame with the second step joined by "and" ("Can you {v} and {t}?")
        frames += TRAIN_CHAIN_FRAMES + [f.replace("{v}", "{v} and {t}").replace("{V}", "{V} and {t}")
                                        for f in _split(VERB_FRAMES, False)]
    return _chains(frames)


def _chains(frames: list[str]) -> list[tuple[str, str, str]]:
    """Each chain frame filled with every first step (a noun phrase paired with a verb phrase) and second step."""
    out = []
    for cat in ("add", "sub", "mul", "div"):
        for (e1, x), (_, v) in zip(NOUN[cat], VERB[cat] * 3):  # each noun phrase paired with a verb phrase
            for sop, thens in THEN.items():
                for t in thens:
                    out += [(e1, "{r}" + sop + "{c}", _fill(f, x=x, v=v, t=t)) for f in frames]
    return out


def linked_chain_skeletons() -> list[tuple[str, str, str]]:
    """Training only: (first expression, second with {r}, question) where the question is any training noun
    frame that is a whole sentence ("How much is {x}?") followed by a CHAIN_LINKS sentence ("Next, {t}."), so
    that a second step is recognised by its own sentence, whatever the first question looked like."""
    firsts = [f for f in _split(NOUN_FRAMES, False) + TRAIN_NOUN_FRAMES if f[-1] in "?." and f.count("{x}") == 1]
    return _chains([f"{f} {link}" for f in firsts for link in CHAIN_LINKS])


def loosen(question: str, rng: random.Random) -> str:
    """A training-only variation of a question template, as people type: the article of an operation noun dropped
    ("the product of" -> "product of"), the first letter's case flipped, a polite tail after a closing operand
    ("... {b} for me.")."""
    if rng.random() < 0.5:
        question = re.sub(r"\b[Tt]he (sum|product|difference|quotient|total|ratio|average|mean) of", r"\1 of",
                          question)
    if rng.random() < 0.3:
        question = question[:1].swapcase() + question[1:]
    if rng.random() < 0.2:
        tail = rng.choice([" for me", ", please", " please", ", thanks", " for me please"])
        question = re.sub(r"(\{[abc]\})([.?]?)$", lambda m: m.group(1) + tail + m.group(2), question)
    return question


def word_problem(rng: random.Random, frames: dict = WORD_FRAMES) -> tuple[str, str, str]:
    """(op, question template, answer template) with a name (and a thing, if the frame has one) filled in;
    {a} {b} {r} left open. frames: WORD_FRAMES or LEVEL_FRAMES. Training only: the held-out word problems are
    chat_data.WORD's held-out templates."""
    op = rng.choice("".join(frames))
    q, a = rng.choice(frames[op])
    fill = {"n": rng.choice(NAMES), "t": rng.choice(THINGS) if "{t}" in q else "", "a": "{a}", "b": "{b}",
            "r": "{r}"}
    return op, q.format(**fill), a.format(**fill)
