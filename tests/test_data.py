"""Data pipeline: readers, cleaning, dedup, build -> tokenize round trip, chat data generators.
Offline: everything reads tests/fixtures/corpus/ (a miniature package cache + user input files)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np

from berrylm.cli import main as berry
from berrylm.train.data.clean import clean_text, keep, split_long
from berrylm.train.data.dedup import MinHasher, dedup
from berrylm.train.data.sources import (
    iter_documents,
    osis_to_text,
    parse_chatterbot,
    quiz_expand,
    strip_rest,
    strip_wiki,
)

CORPUS = Path(__file__).parent / "fixtures" / "corpus"
CACHE = CORPUS / "cache"
INPUTS = CORPUS / "inputs"


# --- cleaning ---

def test_clean_text_normalises():
    raw = "Cafe\u0301\r\n\r\n\r\n\r\nline  two\x07 <|endoftext|>end\u00a0 \n"
    assert clean_text(raw) == "Caf\u00e9\n\nline two end"


def test_keep_drops_short_and_symbol_docs():
    assert not keep("too short")
    assert not keep("| 12 | 34 | 56 | 78 | 90 | 12 | 34 | 56 | 78 | 90 | 12 | 34 |")
    assert keep("A perfectly ordinary sentence about rivers, bread and orchards.")


def test_split_long_cuts_at_paragraphs():
    paras = [f"paragraph {i} " + "word " * 50 for i in range(20)]
    pieces = split_long("\n\n".join(paras), max_chars=1000)
    assert len(pieces) > 1 and all(len(p) <= 1000 for p in pieces)
    assert "\n\n".join(pieces) == "\n\n".join(paras)


# --- dedup ---

def test_dedup_exact_and_near():
    rows = [json.loads(line)["text"] for line in (INPUTS / "notes.jsonl").read_text().splitlines()]
    bread, tea, bread_near, bread_case, _short, cheese = rows
    kept, counts = dedup([bread, tea, bread_near, bread_case, cheese])
    assert kept == [0, 1, 4]
    assert counts == {"exact": 1, "near": 1}


def test_dedup_keeps_docs_that_only_share_a_sentence():
    shared = "The river carried sand from the mountains to the sea. "
    a = shared + "Farmers along its banks grew wheat, barley and beans in the rich silt every year."
    b = shared + "Sailors at its mouth watched storms roll in from the west and counted the ships."
    assert dedup([a, b])[0] == [0, 1]


def test_minhash_estimates_jaccard():
    words = [f"w{i}" for i in range(400)]
    a, b = " ".join(words), " ".join(words[:200] + [f"x{i}" for i in range(200)])
    h = MinHasher(256)
    est = (h.signature(a) == h.signature(b)).mean()
    true = 196 / (396 + 396 - 196)  # 5-gram shingles: 196 shared of 396 each
    assert abs(est - true) < 0.1
    assert (h.signature(a) == h.signature(a)).all()


# --- readers ---

def test_readers_on_fixture_cache():
    wn = list(iter_documents("wordnet", CACHE))
    assert wn and all(d["source"] == "wordnet" for d in wn)
    text = "\n".join(d["text"] for d in wn)
    assert "entity (noun): that which is perceived" in text and "Princeton" not in text  # licence header skipped
    (quiz,) = iter_documents("quiz", CACHE)
    assert "The Netherlands: Amsterdam." in quiz["text"] and "C\u00f4te d'Ivoire: Yamoussoukro." in quiz["text"]
    dialogues = [d["text"] for d in iter_documents("dialogues", CACHE)]
    assert "A: Good morning\nB: Good morning to you too. Did you sleep well?\nA: I did, thank you." in dialogues
    (fortunes,) = iter_documents("fortunes", CACHE)
    assert "Measure twice, train once." in fortunes["text"] and "%" not in fortunes["text"]


def test_markup_strippers():
    assert quiz_expand("Central Africa{n Rep{ublic}}") == "Central African Republic"
    assert quiz_expand("[I |]injure|thwart") == "I injure"
    rest = ("Title\n=====\n\nUse :func:`len` and ``x``.\n\n.. code-block:: python\n\n   hidden = 1\n\n"
            ".. function:: f(x)\n   :noindex:\n\n   Return *x*.\n\n   .. versionadded:: 3.2\n\nafter")
    want = "Title\n\nUse len and x.\n\nf(x)\n\nReturn x.\n\nNew in version 3.2.\n\nafter"
    assert clean_text(strip_rest(rest)) == want
    wiki = "'''Bold''' [[Target|shown]] and [[plain]].{{cite|x}}<ref>r</ref>\n== Head ==\n[[Category:X]]"
    assert strip_wiki(wiki) == "Bold shown and plain.\nHead"
    osis = '<w lemma="a">God</w><note placement="foot">n</note><w>created</w> it .<div eID="g" type="x-p"/>Next'
    assert osis_to_text(osis) == "God created it.\n\nNext"
    convos = parse_chatterbot("categories:\n- x\nconversations:\n- - Hi\n  - Hello\n- - lonely\n")
    assert convos == [["Hi", "Hello"]]


# --- build -> tokenize ---

def _build(tmp_path: Path, *extra: str) -> Path:
    out = tmp_path / "corpus"
    rc = berry(["data", "build", "--sources", "wordnet,quiz,dialogues,fortunes", "--cache", str(CACHE),
                "--input", str(INPUTS), "--out", str(out), "--val-fraction", "0.2", *extra])
    assert rc == 0
    return out


def _docs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_build_reads_all_input_kinds_and_dedups(tmp_path, capsys):
    out = _build(tmp_path)
    printed = capsys.readouterr().out
    docs = _docs(out / "docs.train.jsonl") + _docs(out / "docs.val.jsonl")
    sources = {d["source"] for d in docs}
    assert {"input:orchard", "input:rivers", "input:notes", "input:facts", "wordnet", "quiz", "dialogues",
            "fortunes"} <= sources
    texts = [d["text"] for d in docs]
    assert sum(t.startswith("Bread is one of the") for t in texts) == 1  # exact + near duplicate removed
    assert "ok" not in texts and len(texts) == len(set(texts))
    assert "dedup removed 2 docs" in printed
    assert len(_docs(out / "docs.val.jsonl")) == round(len(docs) * 0.2)
    assert _docs(out / "docs.train.jsonl") == _docs(_build(tmp_path / "again") / "docs.train.jsonl")  # same seed


def test_build_tokenize_round_trip(tmp_path, tokenizer):
    from berrylm.train.data.shards import load_meta, load_shard

    out = _build(tmp_path)
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tokenizer.save(tok_dir)
    assert berry(["data", "tokenize", str(out), "--tokenizer", str(tok_dir)]) == 0
    meta = load_meta(out)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == tokenizer.vocab_size
    assert meta["tokenizer"] == str(tok_dir.resolve())
    per_source: dict[str, dict] = {}
    for split in ("train", "val"):
        docs = _docs(out / f"docs.{split}.jsonl")
        ids = load_shard(out / f"{split}.bin")
        assert ids.dtype == np.uint16 and len(ids) == meta[f"{split}_tokens"]
        assert ids[-1] == tokenizer.endoftext_id and int((ids == 0).sum()) == len(docs)
        assert tokenizer.decode(ids.tolist()).split("<|endoftext|>")[:-1] == [d["text"] for d in docs]
        assert meta[f"{split}_bytes"] == sum(len(d["text"].encode()) for d in docs)
        for d in docs:
            s = per_source.setdefault(d["source"], {"docs": 0, "tokens": 0, "bytes": 0})
            s["docs"] += 1
            s["tokens"] += len(tokenizer.encode(d["text"])) + 1
            s["bytes"] += len(d["text"].encode())
    assert meta["sources"] == per_source


def test_token_dtype():
    from berrylm.train.data.shards import token_dtype

    assert token_dtype(4096) == np.uint16 and token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32


def test_bad_inputs_give_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "no text field"}\n')
    assert berry(["data", "build", "--input", str(bad), "--out", str(tmp_path / "o")]) == 1
    assert 'expected a JSON object with a "text" field' in capsys.readouterr().err
    assert berry(["data", "build", "--input", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 1
    assert berry(["data", "build", "--sources", "gcide", "--out", str(tmp_path / "o")]) == 1
    assert "unknown source 'gcide'" in capsys.readouterr().err
    assert berry(["data", "tokenize", str(tmp_path / "nowhere"), "--tokenizer", str(tmp_path)]) == 1


# --- chat data ---

def _check_conversation(rec: dict) -> None:
    """OpenAI messages shape; every tool call answered by its tool message holding the real calculator result;
    the final assistant message repeats the last tool result."""
    from berrylm.model.calculator import CalcError, calculate

    msgs = rec["messages"]
    roles = [m["role"] for m in msgs]
    assert set(roles) <= {"system", "user", "assistant", "tool"} and roles[-1] == "assistant"
    assert roles[roles[0] == "system"] == "user" and "system" not in roles[1:]
    last_result = None
    for i, m in enumerate(msgs):
        assert isinstance(m["content"], str)
        for call in m.get("tool_calls", []):
            assert m["role"] == "assistant" and call["type"] == "function"
            assert call["function"]["name"] == "calculator"
            expr = json.loads(call["function"]["arguments"])["expression"]
            answer = msgs[i + 1]
            assert answer["role"] == "tool" and answer["tool_call_id"] == call["id"]
            try:
                assert answer["content"] == calculate(expr)
            except CalcError as e:
                assert answer["content"] == f"error: {e}"
            last_result = answer["content"]
        if m["role"] == "tool":
            assert msgs[i - 1].get("tool_calls")
    if last_result is not None:
        final = msgs[-1]["content"]
        assert last_result in final if not last_result.startswith("error") else last_result.split(": ", 1)[1] in final


def test_calculator_conversations_are_valid(tokenizer):
    from berrylm.model.toolcall import format_tool_call
    from berrylm.train.data.chat_data import generate

    recs = generate("calculator", 400, seed=3)
    for rec in recs:
        _check_conversation(rec)
    calls = [c for r in recs for m in r["messages"] for c in m.get("tool_calls", [])]
    exprs = [json.loads(c["function"]["arguments"])["expression"] for c in calls]
    assert len(set(exprs)) > 300 and any("/" in e for e in exprs) and any("(" in e for e in exprs)
    assert any(len(r["messages"]) - (r["messages"][0]["role"] == "system") == 2 for r in recs)  # no-tool answers
    assert any(m["content"].startswith("error") for r in recs for m in r["messages"] if m["role"] == "tool")
    assert any(sum(m["role"] == "tool" for m in r["messages"]) == 2 for r in recs)  # two-call chains
    users = {r["messages"][-len(r["messages"]) + (r["messages"][0]["role"] == "system")]["content"] for r in recs}
    assert len(users) > 350
    rec = next(r for r in recs if r["messages"][-2]["role"] == "tool")
    call = rec["messages"][-3]["tool_calls"][0]["function"]
    text = tokenizer.render_chat(rec["messages"], rec.get("tools"))
    assert format_tool_call("calculator", json.loads(call["arguments"])) in text
    assert f"<tool_response>{rec['messages'][-2]['content']}</tool_response>" in text
    assert generate("calculator", 50, seed=3) == recs[:50]
    assert generate("calculator", 50, seed=4) != recs[:50]


def test_heldout_templates_are_disjoint():
    from berrylm.model.calculator import calculate
    from berrylm.train.data.chat_data import generate, templates

    train, held = templates(heldout=False), templates(heldout=True)
    for kind in train:
        assert train[kind] and held[kind]
        assert not {t for _, t in train[kind]} & {t for _, t in held[kind]}
    train_ids = {i for v in train.values() for i, _ in v}
    recs = generate("calculator", 300, seed=1, heldout=True)
    assert {r["template"] for r in recs}.isdisjoint(train_ids)
    train_users = {m["content"] for r in generate("calculator", 2000, seed=1) for m in r["messages"]
                   if m["role"] == "user"}
    assert not train_users & {r["messages"][-1]["content"] for r in recs}
    # phrasing level: with numbers, case, spacing and punctuation removed no held-out question is a training one
    shape = lambda q: re.sub(r"[^a-z+\-*/×÷n]+", "", re.sub(r"\d+", "n", q.lower().replace("what's", "what is")))
    held_shapes = {shape(r["messages"][-1]["content"]) for r in recs}
    assert not {shape(u) for u in train_users} & held_shapes
    assert any(r["template"].startswith("frame-") for r in recs)
    for r in recs:
        assert r["messages"][-1]["role"] == "user"
        exprs = r["expression"] if isinstance(r["expression"], list) else [r["expression"]]
        if len(exprs) == 1:
            assert r["expected"] == calculate(exprs[0])
    assert len({r["template"] for r in recs}) >= 8


def test_training_only_frames_never_reach_the_heldout_side():
    from berrylm.train.data import calc_phrases as cp

    train_chains = {q for _, _, q in cp.chain_skeletons(heldout=False)}
    held_chains = {q for _, _, q in cp.chain_skeletons(heldout=True)}
    extra = cp._fill(cp.TRAIN_CHAIN_FRAMES[0], x="the sum of {a} and {b}", t="multiply by {c}")
    assert extra in train_chains and extra not in held_chains
    assert not cp.phrasings(list(train_chains)) & cp.phrasings(list(held_chains))
    held_singles = {q for _, _, q in cp.skeletons(heldout=True)}
    assert not any(cp._fill(f, x="{a} plus {b}") in held_singles for f in cp.TRAIN_NOUN_FRAMES)
    assert not any(cp._fill(f, v="add {a} and {b}") in held_singles for f in cp.TRAIN_VERB_FRAMES)
    assert "Can you add {a} and {b} and add {c}?" in train_chains  # a training verb frame, second step by "and"
    assert cp.loosen("Work out {a} times {b}.", random.Random(2)) == "Work out {a} times {b} for me."


def test_linked_chains_are_training_only():
    from berrylm.train.data import calc_phrases as cp
    from berrylm.train.data.chat_data import KINDS, _every_heldout_question, _linked_chains, generate

    linked = _linked_chains()
    assert len(linked) > 100000 and len(linked) < len(cp.linked_chain_skeletons())  # a few equal held-out ones
    assert not cp.phrasings([q for _, _, q in linked]) & cp.phrasings(_every_heldout_question())
    assert ("{a}*{b}", "{r}+{c}", "How much is {a} times {b}? Next, add {c}.") in linked
    assert not any(q == "What is {a} plus {b}? Then add {c}." for _, _, q in linked)  # = held-out CHAIN_FRAMES[3]
    recs = generate("calculator", 50, seed=2, weights=",".join(f"{k}={int(k == 'flink')}" for k in KINDS))
    assert all(sum(m["role"] == "tool" for m in r["messages"]) == 2 for r in recs)


def test_no_training_answer_is_the_bare_result():
    from berrylm.train.data.chat_data import generate

    recs = generate("calculator", 1500, seed=6)
    answered = [(r["messages"][-2]["content"], r["messages"][-1]["content"]) for r in recs
                if r["messages"][-2]["role"] == "tool"]
    assert len(answered) > 1000
    assert not [a for res, a in answered if a.strip(" .") == res]
    assert any(a.startswith("The calculator gives ") for _, a in answered)


def test_dictionary_and_dialogue_from_cache(tmp_path, capsys):
    out = tmp_path / "chat.jsonl"
    assert berry(["data", "chat", "--kind", "dictionary,dialogue", "--n", "30", "--cache", str(CACHE),
                  "--out", str(out)]) == 0
    recs = _docs(out)
    assert len(recs) == 60
    for rec in recs:
        _check_conversation(rec)
    from berrylm.train.data.corpus_chat import wordnet_entries

    known = {f"'{w}' ({pos}) means: {d}." for w, pos, d, _ in wordnet_entries(CACHE)}
    answers = [r["messages"][-1]["content"] for r in recs]
    defs = [a for a in answers if " means: " in a]
    assert len(defs) == 30 and all(a.split(" For example")[0] in known for a in defs)
    assert any(a == "Good morning to you too. Did you sleep well?" for a in answers)
    assert berry(["data", "chat", "--kind", "dialogue", "--heldout", "--n", "3", "--out", str(out)]) == 1
    assert "only defined for --kind calculator" in capsys.readouterr().err


def test_persona_small_talk(tmp_path):
    from berrylm.train.data.persona import INTENTS, NAME

    out = tmp_path / "persona.jsonl"
    assert berry(["data", "chat", "--kind", "persona", "--n", "400", "--seed", "3", "--out", str(out)]) == 0
    recs = _docs(out)
    assert len(recs) == 400
    answers = {a.format(n=NAME) for _, ans in INTENTS.values() for a in ans}
    for rec in recs:
        _check_conversation(rec)
        turns = [m for m in rec["messages"] if m["role"] != "system"]
        assert [m["role"] for m in turns] in (["user", "assistant"], ["user", "assistant"] * 2)
        assert all(m["content"] in answers for m in turns if m["role"] == "assistant")
    said = [m["content"] for r in recs for m in r["messages"] if m["role"] == "assistant"]
    for intent, (_, ans) in INTENTS.items():  # every intent answered
        assert any(s in {a.format(n=NAME) for a in ans} for s in said), intent
    assert sum(len(r["messages"]) >= 4 for r in recs) > 60  # some two-turn conversations
    again = tmp_path / "again.jsonl"  # deterministic for a seed
    assert berry(["data", "chat", "--kind", "persona", "--n", "400", "--seed", "3", "--out", str(again)]) == 0
    assert again.read_text() == out.read_text()


def test_weights_change_the_training_mix(tmp_path, capsys):
    from berrylm.train.data.chat_data import KINDS, TRAIN_WEIGHTS, generate, parse_weights

    w = parse_weights("fchain=48, word=0")
    assert w[KINDS.index("fchain")] == 48 and w[KINDS.index("word")] == 0
    assert [x for k, x in zip(KINDS, w) if k not in ("fchain", "word")] == \
        [x for k, x in zip(KINDS, TRAIN_WEIGHTS) if k not in ("fchain", "word")]
    only_chains = generate("calculator", 200, seed=5, weights=",".join(f"{k}={int(k == 'chain')}" for k in KINDS))
    assert all(sum(m["role"] == "tool" for m in r["messages"]) == 2 for r in only_chains)
    default = generate("calculator", 200, seed=5)
    assert generate("calculator", 200, seed=5, weights="") == default
    assert any(sum(m["role"] == "tool" for m in r["messages"]) != 2 for r in default)
    out = str(tmp_path / "x.jsonl")
    for bad, msg in [("fchain=lots", "is not KIND=NUMBER"), ("blah=1", "unknown calculator kind 'blah'"),
                     ("word=-1", "is negative")]:
        assert berry(["data", "chat", "--n", "3", "--weights", bad, "--out", out]) == 1
        assert msg in capsys.readouterr().err
    assert berry(["data", "chat", "--n", "3", "--heldout", "--weights", "word=1", "--out", out]) == 1
    assert "held-out set's mix is fixed" in capsys.readouterr().err


def test_text_kind_samples_corpus_documents(tmp_path, capsys):
    corpus = _build(tmp_path)
    out = tmp_path / "text.jsonl"
    assert berry(["data", "chat", "--kind", "text", "--n", "5", "--corpus", str(corpus), "--out", str(out)]) == 0
    recs = _docs(out)
    train_texts = [d["text"] for d in _docs(corpus / "docs.train.jsonl")]
    assert len(recs) == 5 and all(set(r) == {"text"} for r in recs)
    assert all(any(t.startswith(r["text"]) for t in train_texts) for r in recs)
    assert berry(["data", "chat", "--kind", "text", "--n", "5", "--corpus", str(tmp_path / "none"),
                  "--out", str(out)]) == 1
    assert "docs.train.jsonl: not found" in capsys.readouterr().err
