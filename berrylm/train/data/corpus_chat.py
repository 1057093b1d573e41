"""Chat records drawn from text corpora (the non-calculator kinds of `berry data chat`, see chat_data.py):

    dictionary  "What does 'X' mean?" answered from WordNet glosses (`berry data fetch --sources wordnet`)
    dialogue    short casual conversations from chatterbot-corpus (`--sources dialogues`)
    text        plain {"text": ...} documents from a built corpus's training split, cut to TEXT_CHARS
Each takes the caller's seeded random.Random, so chat_data.generate stays deterministic for a seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from berrylm.train.data.chat_data import SYSTEM_PROMPTS

DICT_QUESTIONS = ["What does '{w}' mean?", "Define {w}.", "What is the meaning of the word \"{w}\"?",
                  "{w}: what does it mean?", "Can you explain the word {w}?", "meaning of {w}?"]


def wordnet_entries(cache: str | Path) -> list[tuple[str, str, str, list[str]]]:
    """(word, part of speech, definition, examples) for every synset's first word."""
    root = Path(cache) / "x/usr/share/wordnet"
    if not (root / "data.noun").exists():
        raise ValueError(f"no WordNet in {cache}: run `berry data fetch --sources wordnet --cache {cache}`")
    out = []
    for pos, name in [("noun", "noun"), ("verb", "verb"), ("adj", "adjective"), ("adv", "adverb")]:
        for line in (root / f"data.{pos}").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue
            head, gloss = line.split("|", 1)
            word = head.split()[4].split("(")[0].replace("_", " ")
            parts = [p.strip() for p in gloss.strip().split(";")]
            definition = "; ".join(p for p in parts if not p.startswith('"'))
            examples = [p.strip('"') for p in parts if p.startswith('"')]
            if definition:
                out.append((word, name, definition, examples))
    return out


def dictionary_examples(cache: str | Path, n: int, rng: random.Random) -> list[dict]:
    entries = wordnet_entries(cache)
    out = []
    for _ in range(n):
        w, pos, d, ex = rng.choice(entries)
        answer = f"'{w}' ({pos}) means: {d}."
        if ex:
            answer += f" For example: \"{rng.choice(ex)}\"."
        system = rng.choice(SYSTEM_PROMPTS)
        out.append({"messages": ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": rng.choice(DICT_QUESTIONS).format(w=w)},
            {"role": "assistant", "content": answer}]})
    return out


def dialogue_examples(cache: str | Path, n: int, rng: random.Random) -> list[dict]:
    from berrylm.train.data.sources import parse_chatterbot

    files = sorted((Path(cache) / "x/chatterbot_corpus/data/english").glob("*.yml"))
    if not files:
        raise ValueError(f"no chatterbot corpus in {cache}: run `berry data fetch --sources dialogues --cache {cache}`")
    convos, seen = [], set()
    for f in files:
        for c in parse_chatterbot(f.read_text(encoding="utf-8")):
            c = c[: len(c) // 2 * 2]  # end on an assistant turn
            if tuple(c) not in seen:
                seen.add(tuple(c))
                convos.append(c)
    out = []
    for _ in range(n):
        c = rng.choice(convos)
        out.append({"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                                 for i, t in enumerate(c)]})
    return out


TEXT_CHARS = 3000


def text_examples(corpus: str | Path, n: int, rng: random.Random) -> list[dict]:
    """n documents (with replacement when the corpus has fewer), each cut to TEXT_CHARS at a line break."""
    path = Path(corpus) / "docs.train.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (build a corpus first: berry data build --out {corpus})")
    docs = [json.loads(ln)["text"] for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not docs:
        raise ValueError(f"{path}: no documents")
    picks = rng.sample(docs, n) if n <= len(docs) else [rng.choice(docs) for _ in range(n)]
    out = []
    for d in picks:
        if len(d) > TEXT_CHARS:
            cut = d.rfind("\n", 0, TEXT_CHARS)
            d = d[: cut if cut > TEXT_CHARS // 2 else TEXT_CHARS]
        out.append({"text": d})
    return out
