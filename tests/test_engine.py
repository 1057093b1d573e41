"""Engine unit tests: paged batched forward == contiguous per-sequence forward, prefix caching, preemption,
seeded sampling independent of the batch and equal to the offline decode loop's, stop strings / UTF-8
detokenization, JSON mode, hybrid model."""

from __future__ import annotations

import pytest
import torch

from berrylm.model.cache import KVCache
from berrylm.model.checkpoint import load_checkpoint
from berrylm.serve.backend import TorchBackend
from berrylm.serve.detokenizer import Detokenizer, token_bytes_table
from berrylm.serve.engine import Engine, EngineConfig
from berrylm.serve.json_guide import START, feed, is_complete
from berrylm.serve.kv_cache import PagedBatch
from berrylm.serve.sampler import SamplingParams
from tests.json_oracle import is_json_object, is_json_object_prefix

# float32 noise between two orders of summation at the test models' logit scale (|logits| up to ~5); a wrong K/V
# row or position moves logits by 0.1 or more
ATOL = 5e-5
TEXTS = ["the quick brown fox", "a", "hello world, this is a somewhat longer prompt with more words in it",
         "one two three four five six"]


def _backend(path) -> TorchBackend:
    model, tok = load_checkpoint(path)
    return TorchBackend(model, tok)


def _solo_logits(model, prompt: list[int], steps: list[int]) -> list[torch.Tensor]:
    """Logits of the last position after the prompt, then after each token of `steps`, with KVCache."""
    cache = KVCache(model.cfg, 1, 256)
    with torch.inference_mode():
        out = [model(torch.tensor([prompt]), cache=cache)[0, -1]]
        for t in steps:
            out.append(model(torch.tensor([[t]]), cache=cache)[0, -1])
    return out


@pytest.mark.parametrize("arch", ["llama", "hybrid"])
def test_batched_paged_decode_equals_single(arch, llama_checkpoint, hybrid_checkpoint):
    be = _backend(llama_checkpoint if arch == "llama" else hybrid_checkpoint)
    eng = Engine(be, EngineConfig(max_batch=8, block_size=4, num_blocks=256))
    tok = be.tokenizer
    prompts = [tok.encode(t) for t in TEXTS]
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths in one batch
    # prefill each sequence into its own blocks, then decode three steps for all of them in one batch
    tables, slots = [], list(range(len(prompts)))
    for i, p in enumerate(prompts):
        tables.append([eng.blocks.append_block() for _ in range(-(-(len(p) + 3) // 4))])
        eng.pool.reset_slot(i)
        with torch.inference_mode():
            be.forward(torch.tensor([p]), PagedBatch(eng.pool, [tables[i]], [0], len(p), [i]))
    steps = [[7, 8, 9], [10, 11, 12], [13, 14, 15], [16, 17, 18]]
    batched = []
    for j in range(3):
        starts = [len(p) + j for p in prompts]
        toks = torch.tensor([[s[j]] for s in steps])
        with torch.inference_mode():
            batched.append(be.forward(toks, PagedBatch(eng.pool, tables, starts, 1, slots))[:, -1])
    for i, p in enumerate(prompts):
        ref = _solo_logits(be.model, p, steps[i])
        for j in range(3):
            torch.testing.assert_close(batched[j][i], ref[j + 1], atol=ATOL, rtol=0)


def _greedy(n: int = 12) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=True)


@pytest.mark.parametrize("arch", ["llama", "hybrid"])
def test_engine_batch_equals_alone(arch, llama_checkpoint, hybrid_checkpoint):
    be = _backend(llama_checkpoint if arch == "llama" else hybrid_checkpoint)
    prompts = [be.tokenizer.encode(t) for t in TEXTS]
    together = Engine(be, EngineConfig(max_batch=8, block_size=4, num_blocks=256)).generate(prompts, _greedy())
    for p, out in zip(prompts, together):
        alone = Engine(be, EngineConfig(max_batch=1, block_size=4, num_blocks=256)).generate([p], _greedy())[0]
        assert out.tokens == alone.tokens and out.finish_reason == "length" and len(out.tokens) == 12
        assert len(set(out.tokens)) >= 4, out.tokens  # varied output: batching is compared on real text
        for a, b in zip(out.logprobs, alone.logprobs):
            assert abs(a.logprob - b.logprob) < ATOL
        # and equal to a plain greedy loop over the contiguous KVCache
        ref = _solo_logits(be.model, p, out.tokens[:-1])
        assert [int(x.argmax()) for x in ref] == out.tokens


def test_chunked_prefill_equals_whole(llama_checkpoint):
    be = _backend(llama_checkpoint)
    p = be.tokenizer.encode(" ".join(TEXTS * 3))
    whole = Engine(be, EngineConfig(block_size=4, num_blocks=256)).generate([p], _greedy(6))[0]
    chunked = Engine(be, EngineConfig(block_size=4, num_blocks=256, prefill_chunk=7)).generate([p], _greedy(6))[0]
    assert whole.tokens == chunked.tokens
    assert all(abs(a.logprob - b.logprob) < ATOL for a, b in zip(whole.logprobs, chunked.logprobs))


def test_hybrid_prefill_in_chunks_of_one_and_two_equals_whole(hybrid_checkpoint):
    """Linear heads take one token through the recurrent step and more through the chunked path: a prompt fed
    1 or 2 tokens per forward gives the same tokens and logprobs as one forward."""
    be = _backend(hybrid_checkpoint)
    p = be.tokenizer.encode(TEXTS[0])[:9]
    whole = Engine(be, EngineConfig(block_size=4, num_blocks=64)).generate([p], _greedy(4))[0]
    for chunk in (1, 2):
        out = Engine(be, EngineConfig(block_size=4, num_blocks=64, prefill_chunk=chunk)).generate([p], _greedy(4))[0]
        assert out.tokens == whole.tokens
        assert all(abs(a.logprob - b.logprob) < ATOL for a, b in zip(whole.logprobs, out.logprobs))


def test_prefix_cache_hit_equals_miss(llama_checkpoint):
    be = _backend(llama_checkpoint)
    tok = be.tokenizer
    system = tok.encode_chat([{"role": "system", "content": " ".join(TEXTS)}])
    turn1 = system + tok.encode_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    eng = Engine(be, EngineConfig(block_size=4, num_blocks=256))
    first = eng.generate([turn1], _greedy(8))[0]
    # second turn: the whole first exchange is a prefix of the new prompt
    turn2 = turn1 + first.tokens + tok.encode_chat([{"role": "user", "content": "and then?"}],
                                                   add_generation_prompt=True)
    rid = eng.add_request(turn2, _greedy(8))
    seq = eng.scheduler.waiting[0] if eng.scheduler.waiting else eng._inbox[0][0]
    assert seq.request_id == rid
    eng.step()
    assert seq.cached_tokens >= len(turn1) - 4  # everything but the last partial block came from the cache
    hit_tokens = []
    seq.sink = lambda d: hit_tokens.extend(d.tokens)
    while eng.has_work():
        eng.step()
    miss = Engine(be, EngineConfig(block_size=4, num_blocks=256, prefix_caching=False)).generate([turn2], _greedy(8))
    assert seq.output == miss[0].tokens
    assert eng.blocks.hits > 0


def test_prefix_cache_chains_block_hashes(llama_checkpoint):
    """A cached block is reused only after the same prefix: its hash chains the previous block's. A = P+Q caches Q's
    block computed after P; C = R+Q computes Q after R; D = R+Q+S must reuse C's Q block, not A's (whose K/V
    saw P). Checked against an engine without a prefix cache, logprob by logprob."""
    be = _backend(llama_checkpoint)
    tok = be.tokenizer

    def block(text: str) -> list[int]:  # exactly two 4-token blocks
        ids = tok.encode(text)
        assert len(ids) >= 8, text
        return ids[:8]

    P, R, Q = block("the quick brown fox jumps"), block("one two three four five six"), block("hello world, this is")
    S = tok.encode(" and more words")
    cached = Engine(be, EngineConfig(block_size=4, num_blocks=256))
    fresh = Engine(be, EngineConfig(block_size=4, num_blocks=256, prefix_caching=False))
    for prompt in (P + Q, R + Q, R + Q + S):
        hit, miss = cached.generate([prompt], _greedy(8))[0], fresh.generate([prompt], _greedy(8))[0]
        assert hit.tokens == miss.tokens, prompt
        assert all(abs(a.logprob - b.logprob) < ATOL for a, b in zip(hit.logprobs, miss.logprobs)), prompt
    assert cached.blocks.hits == 16  # D reused R and Q (4 blocks of 4), A's Q block was never taken for C or D


def test_prefix_cache_hit_counts_are_exact(llama_checkpoint):
    """Every full block of a cached prefix is reused, leaving just one token to compute (the logits need it), also
    when the prompt ends one token past a block boundary; a turn's own new blocks are found by the next turn (the
    hash chain goes on from the cached blocks it started with)."""
    be = _backend(llama_checkpoint)
    tok = be.tokenizer
    eng = Engine(be, EngineConfig(block_size=4, num_blocks=128))
    base = tok.encode(" ".join(TEXTS))[:21]  # 5 full blocks and one token
    first = eng.generate([base], _greedy(7))[0]  # computes 21 + 6 tokens: 6 full blocks
    eng.generate([base], _greedy(1))
    assert eng.blocks.hits == 20
    turn2 = base + first.tokens + tok.encode(" and more words here")
    out2 = eng.generate([turn2], _greedy(7))[0]
    assert eng.blocks.hits == 20 + 24
    turn3 = turn2 + out2.tokens + tok.encode(" then")  # turn 2 computed len(turn2) + 6 tokens
    eng.generate([turn3], _greedy(1))
    assert eng.blocks.hits == 20 + 24 + (len(turn2) + 6) // 4 * 4


def test_identical_prompts_side_by_side_keep_the_cache_consistent(llama_checkpoint):
    """Two identical prompts in one batch compute the same blocks; only one is published, and after both finish
    every hashed block is the one the cache maps its hash to, through evictions too."""
    be = _backend(llama_checkpoint)
    tok = be.tokenizer
    eng = Engine(be, EngineConfig(block_size=4, num_blocks=24))
    p = tok.encode(" ".join(TEXTS))[:30]
    a, b = eng.generate([p, p], _greedy(6))
    assert a.tokens == b.tokens
    bm = eng.blocks

    def consistent() -> bool:
        return all(bm.cached.get(h) == blk for blk, h in enumerate(bm.block_hash) if h is not None)

    assert consistent() and len(bm.cached) == (len(p) + 5) // 4
    for text in TEXTS * 3:  # other prompts evict the cached blocks, oldest first
        eng.generate([tok.encode(text + " " + text)], _greedy(8))
        assert consistent()
    assert bm.num_free() == 24


def test_admission_waits_for_blocks_instead_of_preempting(llama_checkpoint):
    """With KV for one sequence at a time, the second waits in the queue until the first finishes: no preemption,
    and each output is what it is alone."""
    be = _backend(llama_checkpoint)
    tok = be.tokenizer
    prompts = [tok.encode(t)[:8] for t in (TEXTS[0] + " jumps over", TEXTS[3])]
    assert all(len(p) == 8 for p in prompts)
    eng = Engine(be, EngineConfig(max_batch=4, block_size=4, num_blocks=4, max_model_len=16, prefix_caching=False))
    outs = eng.generate(prompts, _greedy(8))
    assert eng.scheduler.preemptions == 0
    for p, o in zip(prompts, outs):
        assert o.tokens == Engine(be, EngineConfig(block_size=4, num_blocks=64)).generate([p], _greedy(8))[0].tokens


def test_admission_of_prompts_of_one_two_and_three_tokens(llama_checkpoint):
    """The shortest prompts are admitted and run: one token is decoded at once, two or three are prefilled first
    (a scheduler that left a sequence with two tokens to compute in neither list would hang here; the tests'
    timeout is the hang guard)."""
    be = _backend(llama_checkpoint)
    prompts = [be.tokenizer.encode(TEXTS[0])[:n] for n in (1, 2, 3)]
    outs = Engine(be, EngineConfig(block_size=4, num_blocks=64)).generate(prompts, _greedy(5))
    assert [len(o.tokens) for o in outs] == [5, 5, 5]


def test_n_shares_prefill_and_seeds_differ(llama_checkpoint):
    be = _backend(llama_checkpoint)
    eng = Engine(be, EngineConfig(block_size=4, num_blocks=256))
    p = be.tokenizer.encode(" ".join(TEXTS))
    got: dict[int, list[int]] = {}
    eng.add_request(p, SamplingParams(temperature=1.0, seed=5, max_tokens=10, ignore_eos=True), n=3,
                    sink=lambda d: got.setdefault(d.index, []).extend(d.tokens))
    while eng.has_work():
        eng.step()
    assert sorted(got) == [0, 1, 2] and all(len(v) == 10 for v in got.values())
    assert eng.blocks.hits == 2 * ((len(p) - 1) // 4 * 4) # the two siblings reused the leader's prompt blocks
    assert len({tuple(v) for v in got.values()}) > 1


def test_preemption_under_tiny_kv_budget(llama_checkpoint, hybrid_checkpoint):
    for path in (llama_checkpoint, hybrid_checkpoint):
        be = _backend(path)
        prompts = [be.tokenizer.encode(t) for t in TEXTS] * 2
        params = [SamplingParams(temperature=0.8, seed=i, max_tokens=24, ignore_eos=True) for i in range(len(prompts))]
        tiny = Engine(be, EngineConfig(max_batch=8, block_size=4, num_blocks=16, max_model_len=64))
        outs = tiny.generate(prompts, params)
        assert tiny.scheduler.preemptions > 0
        big = Engine(be, EngineConfig(max_batch=8, block_size=4, num_blocks=512, max_model_len=64))
        ref = big.generate(prompts, params)
        assert big.scheduler.preemptions == 0
        assert [o.tokens for o in outs] == [r.tokens for r in ref]
        assert tiny.blocks.num_free() == 16  # everything released
        assert sorted(tiny.scheduler.free_slots) == list(range(8))  # every linear-state slot back, slot 0 too


def test_seeded_sampling_independent_of_batch(llama_checkpoint):
    be = _backend(llama_checkpoint)
    p = be.tokenizer.encode("the quick brown fox")
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    alone = Engine(be).generate([p], params)[0].tokens
    others = [be.tokenizer.encode(t) for t in TEXTS]
    mixed = Engine(be).generate(others + [p], [SamplingParams(temperature=1.0, seed=i, max_tokens=20)
                                               for i in range(len(others))] + [params])[-1].tokens
    assert alone == mixed
    other_seed = Engine(be).generate([p], SamplingParams(temperature=1.0, seed=99, max_tokens=16,
                                                         ignore_eos=True))[0].tokens
    assert other_seed != alone


@pytest.mark.parametrize("arch", ["llama", "hybrid"])
def test_offline_loop_samples_what_the_engine_samples(arch, llama_checkpoint, hybrid_checkpoint):
    """One sampler: model/generate.py (evals, verification, report samples) and the engine draw the same tokens
    for the same prompt, seed and temperature; greedy too."""
    from berrylm.model.generate import generate

    be = _backend(llama_checkpoint if arch == "llama" else hybrid_checkpoint)
    eng = Engine(be, EngineConfig(max_batch=8, block_size=4, num_blocks=256))
    for text in TEXTS:
        p = be.tokenizer.encode(text)
        for temperature, seed in ((0.0, 0), (0.9, 7), (1.3, 12345)):
            params = SamplingParams(temperature=temperature, seed=seed, max_tokens=16, ignore_eos=True)
            served = eng.generate([p], params)[0].tokens
            offline, _ = generate(be.model, p, 16, temperature=temperature, seed=seed, max_len=len(p) + 16)
            assert offline == served, (text, temperature)


def test_penalties_and_logit_bias(llama_checkpoint):
    be = _backend(llama_checkpoint)
    p = be.tokenizer.encode("hello")
    base = Engine(be).generate([p], _greedy(8))[0].tokens
    biased = Engine(be).generate([p], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                     logit_bias={42: 100.0}))[0].tokens
    assert biased == [42] * 8 != base
    rep = Engine(be).generate([p], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                  frequency_penalty=2.0, presence_penalty=2.0))[0].tokens
    assert len(set(rep)) > len(set(base)) or len(set(rep)) == 8
    # each penalty alone applies: a large presence or frequency penalty makes greedy output never repeat a token
    base = Engine(be).generate([p], _greedy(40))[0].tokens
    assert len(set(base)) < 40
    for one in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}):
        alone = Engine(be).generate([p], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, **one))
        assert len(set(alone[0].tokens)) == 40, one


def test_top_logprobs_are_the_best_tokens_best_first(llama_checkpoint):
    """top_logprobs=k gives, for every generated token, the k best (token, logprob) pairs, best first: under greedy
    decoding the first is the token drawn; a request without it gets none."""
    be = _backend(llama_checkpoint)
    p = be.tokenizer.encode("hello")
    asked = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=True, top_logprobs=3)
    with_top, plain = Engine(be).generate([p, p], [asked, _greedy(6)])
    assert with_top.tokens == plain.tokens and all(o.top is None for o in plain.logprobs)
    for o in with_top.logprobs:
        assert len(o.top) == 3 and o.top[0][0] == o.token and abs(o.top[0][1] - o.logprob) < ATOL
        assert [lp for _, lp in o.top] == sorted((lp for _, lp in o.top), reverse=True)


def test_detokenizer_flush_ends_an_unfinished_character(tokenizer):
    """A generation that ends inside a UTF-8 character releases U+FFFD for it at flush, also with stop strings
    that never matched; after a stop, flush releases nothing more."""
    half = token_bytes_table(tokenizer).index(b"\xe6")  # the first byte of a 3-byte character
    ids = tokenizer.encode("ab")
    for stop in ([], ["zz"]):
        d = Detokenizer(tokenizer, stop=stop)
        assert "".join(d.add(t) for t in [*ids, half]) + d.flush() == "ab\ufffd"
    d = Detokenizer(tokenizer, stop=["b"])
    assert "".join(d.add(t) for t in [*ids, half]) + d.flush() == "a"


def test_detokenizer_stop_strings_and_utf8(tokenizer):
    text = "naïve café — 東京 says hello world"
    ids = tokenizer.encode(text)
    d = Detokenizer(tokenizer)
    pieces = [d.add(t) for t in ids] + [d.flush()]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    for stop in ["lo wor", "東京", "o w", "zzz", "naïv", "n", "東"]:  # also at the very start, and one character
        d = Detokenizer(tokenizer, stop=[stop])
        out = ""
        for t in ids:
            out += d.add(t)
            assert stop not in out
            if d.stopped:
                break
        out += d.flush()
        assert out == (text.split(stop)[0] if stop in text else text)


def test_json_validator():
    good = '{"a": [1, -2.5e3, true, null, {"b": "x\\"y\\u00e9"}], "c": {}}'
    for i in range(len(good)):
        assert feed(START, good[:i].encode()) is not None, good[:i]
    assert is_complete(feed(START, good.encode()))
    for bad in ['[1]', '{"a" 1}', '{"a": 01}', '{"a": tru', '{,}', '{"a": 1}}', '{"a":1,}']:
        st = feed(START, bad.encode())
        assert st is None or (bad.endswith("tru") and not is_complete(st)), bad


def test_json_guide_agrees_with_an_independent_parser():
    """The guide accepts exactly the prefixes that json.loads can complete into an object (tests/json_oracle.py),
    over 20k random strings of JSON's alphabet; it refuses whitespace after a complete object by design (then only
    EOS may follow)."""
    import random

    alphabet = list('{}[]",:0123 -.eE+tfnrulsa\\u\n') + ['"a"', "true", "null", "1.5", '\\"', "é"]
    rng, accepted = random.Random(0), 0
    for _ in range(20_000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        guide = feed(START, s.encode()) is not None
        accepted += guide
        if s != s.rstrip() and is_json_object(s.rstrip()):
            assert not guide, s
        else:
            assert guide == is_json_object_prefix(s), s
    assert accepted > 1000  # the strings reach deep into the grammar, not only its first character


def test_json_mode_output_is_json(llama_checkpoint):
    """Sampled JSON-mode output, judged by json.loads + jsonschema: finished choices are one object; cut ones
    (length) are a prefix that json.loads accepts once completed."""
    be = _backend(llama_checkpoint)
    p = be.tokenizer.encode("Reply in JSON:")
    outs = Engine(be).generate([p] * 8, [SamplingParams(temperature=1.0, seed=s, max_tokens=80, json_mode=True)
                                         for s in range(8)])
    finished = [o for o in outs if o.finish_reason == "stop"]
    assert len(finished) >= 2, [o.finish_reason for o in outs]  # the check below is exercised
    for o in outs:
        assert (is_json_object if o.finish_reason == "stop" else is_json_object_prefix)(o.text), o.text
