"""Per-request sampling parameters -> batched tensors -> kernels.sampling (penalties, filters, seeded draw).

Everything is one batched call per step; penalties and logprobs run only when some row asks for them.
A row's draw depends only on (its seed, its step), so the same seed gives the same text whatever else
is in the batch. Grammar-guided rows (serve/grammar.py: JSON schemas, regexes, grammars, strict tool calls) draw
from their grammar's mask, computed for all of them at once before the draw. JSON mode and tool-call rows get a
guided draw (serve/json_guide.py, serve/tools/openai_tools.py): the drawn token is checked
against the JSON prefix validator and, if it would break the JSON, masked out and redrawn (a few times; then
one draw among the first allowed tokens of the best-scoring ones, so a hostile logit_bias costs a bounded amount).
"""

from __future__ import annotations

import torch

from berrylm.kernels.sampling import apply_penalties, sample
from berrylm.serve.params import SampleOut, SamplingParams, sibling_seed

__all__ = ["SampleOut", "SamplingParams", "bias_tensors", "penalised_logits", "sample_batch", "sibling_seed"]


def bias_tensors(p: SamplingParams, device) -> tuple[torch.Tensor, torch.Tensor]:
    """p.logit_bias as (ids [K] int64, values [K] float32), built once per request (cached on p)."""
    if p._bias is None or p._bias[0].device != torch.device(device):
        ids = torch.tensor(list(p.logit_bias), dtype=torch.int64, device=device)
        vals = torch.tensor(list(p.logit_bias.values()), dtype=torch.float32, device=device)
        p._bias = (ids, vals)
    return p._bias


def penalised_logits(logits: torch.Tensor, seqs: list) -> torch.Tensor:
    """logits [B, V] -> logits with each row's penalties and logit_bias applied (rows without them untouched)."""
    rows = [i for i, s in enumerate(seqs) if s.params.needs_penalties]
    if not rows:
        return logits
    B, V = len(rows), logits.shape[1]
    dev = logits.device
    counts = torch.zeros(B, V, device=dev)
    prompt_mask = torch.zeros(B, V, dtype=torch.bool, device=dev)
    bias = torch.zeros(B, V, device=dev)
    for j, i in enumerate(rows):
        s = seqs[i]
        if s.output:
            out = torch.tensor(s.output, device=dev)
            counts[j].index_add_(0, out, torch.ones(len(s.output), device=dev))
        prompt_mask[j, torch.tensor(s.prompt, device=dev)] = True
        if s.params.logit_bias:
            ids, vals = bias_tensors(s.params, dev)
            bias[j, ids] = vals
    f = lambda name: torch.tensor([getattr(seqs[i].params, name) for i in rows], device=dev, dtype=torch.float32)
    pen = apply_penalties(logits[rows], counts, f("presence_penalty"), f("frequency_penalty"),
                          f("repetition_penalty"), prompt_mask, bias)
    logits = logits.clone()
    logits[rows] = pen
    return logits


def draw(logits: torch.Tensor, seqs: list, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One seeded draw per row. logits [B, V] (penalised); mask [B, V] bool of banned tokens or None."""
    dev = logits.device
    p = [s.params for s in seqs]
    x = logits if mask is None else logits.masked_fill(mask, float("-inf"))
    # the per-row parameters cross to the device in two copies (pinned, asynchronous on CUDA), not six
    floats = torch.tensor([[q.temperature for q in p], [q.top_p for q in p], [q.min_p for q in p]],
                          dtype=torch.float32)  # [3, B]
    ints = torch.tensor([[q.top_k for q in p], [q.seed for q in p], [len(s.output) for s in seqs]],
                        dtype=torch.int64)  # [3, B]
    if dev.type == "cuda":
        floats = floats.pin_memory().to(dev, non_blocking=True)
        ints = ints.pin_memory().to(dev, non_blocking=True)
    t, top_p, min_p = floats
    top_k, seed, step = ints
    return sample(x, t, top_k, top_p, min_p, seed, step)


def sample_batch(logits: torch.Tensor, seqs: list) -> list[SampleOut]:
    """logits [B, V] float32 of the last position of each sequence -> one SampleOut per sequence."""
    logits = penalised_logits(logits, seqs)
    ban = grammar_bans(logits, seqs)
    if all(s.params.temperature == 0 for s in seqs):  # all greedy: skip the filters and the noise
        tokens = (logits if ban is None else logits.masked_fill(ban, float("-inf"))).argmax(dim=1)
        logprobs = logits.log_softmax(dim=1).gather(1, tokens.unsqueeze(1)).squeeze(1)
    else:
        tokens, logprobs = draw(logits, seqs, ban)
    guided = [i for i, s in enumerate(seqs) if s.guide is not None and not getattr(s.guide, "masks", False)]
    if guided:
        tokens, logprobs = _guided(logits, seqs, guided, tokens, logprobs)
    want_top = [i for i, s in enumerate(seqs) if s.params.top_logprobs > 0]
    tops: dict[int, list[tuple[int, float]]] = {}
    if want_top:
        k = max(seqs[i].params.top_logprobs for i in want_top)
        lp, ix = logits[want_top].log_softmax(-1).topk(k, dim=-1)
        for j, i in enumerate(want_top):
            n = seqs[i].params.top_logprobs
            tops[i] = list(zip(ix[j, :n].tolist(), lp[j, :n].tolist()))
    tl, ll = tokens.tolist(), logprobs.tolist()
    return [SampleOut(tl[i], ll[i], tops.get(i)) for i in range(len(seqs))]


def grammar_bans(logits: torch.Tensor, seqs: list) -> torch.Tensor | None:
    """[B, V] bool of the tokens each grammar-guided row may not draw (serve/grammar.py), or None without such rows:
    the masks of all of them in one batched call per guide class, before the draw. (Drawing first and masking only
    rejected rows was measured slower: berry-chat's unconstrained draw broke the schema in 53% of the steps, and
    the second draw cost more than the masks it saved.) A row whose grammar allows no token fails, alone."""
    rows = [i for i, s in enumerate(seqs) if getattr(s.guide, "masks", False) and s.guide.active]
    if not rows:
        return None
    ban = torch.zeros_like(logits, dtype=torch.bool)
    for cls in {type(seqs[i].guide) for i in rows}:  # one class when serving; the bench compares engines
        mine = [i for i in rows if type(seqs[i].guide) is cls]
        allowed = cls.batch_masks([seqs[i].guide for i in mine], logits.shape[1]).to(logits.device)
        if not bool(allowed.any(dim=1).all()):
            raise ValueError("no token can continue the grammar")
        ban[mine] = ~allowed
    return ban


def _guided(logits, seqs, rows, tokens, logprobs, max_tries: int = 4, candidates: int = 1024, enough: int = 16):
    """Redraw the JSON-mode rows until their token keeps the output a valid JSON prefix. After `max_tries` redraws
    a row draws once among the first `enough` allowed tokens of its `candidates` best-scoring ones (the full
    vocabulary scan is left for a row none of those allow)."""
    sub = logits[rows]
    banned = torch.zeros_like(sub, dtype=torch.bool)
    sseqs = [seqs[i] for i in rows]
    tok = tokens[rows].clone()
    pending = list(range(len(rows)))
    for attempt in range(max_tries + 1):
        bad = []
        for j in pending:
            if not sseqs[j].guide.allows(int(tok[j])):
                banned[j, tok[j]] = True
                bad.append(j)
        if not bad:
            break
        if attempt == max_tries:  # stop redrawing: restrict these rows to allowed tokens among the best ones
            order = sub[bad].topk(min(candidates, sub.shape[1]), dim=-1).indices.tolist()
            for j, cand in zip(bad, order):
                ok = []
                for t in cand:
                    if not banned[j, t] and sseqs[j].guide.allows(t):
                        ok.append(t)
                        if len(ok) == enough:
                            break
                if ok:
                    banned[j] = True
                    banned[j, ok] = False
                else:  # nothing allowed among the best: one scan of the whole vocabulary
                    banned[j] = ~sseqs[j].guide.allowed_mask(sub.shape[1], sub.device)
        t2, _ = draw(sub[bad], [sseqs[j] for j in bad], banned[bad])
        tok[bad] = t2
        pending = bad
    tokens = tokens.clone()
    tokens[rows] = tok
    lp = logits.log_softmax(-1).gather(1, tokens.unsqueeze(1)).squeeze(1)
    return tokens, lp
