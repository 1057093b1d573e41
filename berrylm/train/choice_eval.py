"""Multiple-choice accuracy by log-likelihood, computed the way lm-evaluation-harness computes it, in-process.

    berry eval MODEL --choices berrylm/train/evals/berry_arith/berry_arith.jsonl

A record is {"question", "choices": [...], "answer": index}. The context is "Question: {question}\\nAnswer:" and
each continuation " " + choice (lm-eval's `doc_to_text`, target delimiter " "); a continuation's score is the sum of
its tokens' logprobs, its tokens being those of encode(context + continuation) after encode(context) (lm-eval's
`_encode_pair`, with the context's trailing spaces moved to the continuation). `acc` is the share of records whose
best-scoring choice is the answer; `acc_norm` divides each score by the choice's length in characters. The same
records run through `lm-eval --model local-completions` against `berry serve` (berrylm/train/evals/berry_arith/
berry_arith.yaml) give the same numbers: tests/test_lm_eval.py checks that.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def context_of(rec: dict) -> str:
    return f"Question: {rec['question']}\nAnswer:"


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    return ctx, whole[len(ctx):]


@torch.inference_mode()
def loglikelihood(model, ctx: list[int], cont: list[int]) -> float:
    tokens = torch.tensor([ctx + cont])
    lp = model(tokens)[0, :-1].float().log_softmax(-1)
    targets = tokens[0, 1:]
    per = lp.gather(1, targets.unsqueeze(1)).squeeze(1)
    return float(per[len(ctx) - 1:].sum())


def choice_accuracy(model, tok, records: list[dict]) -> dict:
    correct = correct_norm = 0
    for rec in records:
        scores, norms = [], []
        for choice in rec["choices"]:
            ctx, cont = encode_pair(tok, context_of(rec), " " + choice)
            s = loglikelihood(model, ctx, cont)
            scores.append(s)
            norms.append(s / len(choice))
        correct += max(range(len(scores)), key=scores.__getitem__) == rec["answer"]
        correct_norm += max(range(len(norms)), key=norms.__getitem__) == rec["answer"]
    n = len(records)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": n}


def read_records(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    recs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not recs or any(not {"question", "choices", "answer"} <= set(r) for r in recs):
        raise ValueError(f"{path}: expected JSONL records with question, choices and answer")
    return recs
