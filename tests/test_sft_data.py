"""Chat SFT data: the assistant-only loss mask, packing into rows, plain-text records, and the batches a step
gets (berrylm/train/sft.py); training itself is in test_train.py."""

from __future__ import annotations

import json

import pytest
import torch

from berrylm.train.sft import ChatBatches, encode_with_mask, pack

CONVO = [
    {"role": "system", "content": "You are Berry."},
    {"role": "user", "content": "What is 12 times 7?"},
    {"role": "assistant", "content": "Let me compute.",
     "tool_calls": [{"type": "function", "function": {"name": "calculator", "arguments": {"expression": "12*7"}}}]},
    {"role": "tool", "content": "84"},
    {"role": "assistant", "content": "12 times 7 is 84."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome."},
]


def spans(ids: list[int], mask: list[bool]) -> list[list[int]]:
    out, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def test_sft_mask_covers_exactly_the_assistant_tokens(tokenizer):
    ids, mask = encode_with_mask(tokenizer, CONVO)
    assert ids == tokenizer.encode_chat(CONVO)
    got = [tokenizer.decode(s) for s in spans(ids, mask)]
    assert got == ['Let me compute.<tool_call>{"name": "calculator", "arguments": {"expression": "12*7"}}'
                   "</tool_call><|im_end|>", "12 times 7 is 84.<|im_end|>", "You're welcome.<|im_end|>"]
    # everything else (system, user, tool turns, the assistant headers, newlines) carries no loss
    unmasked = tokenizer.decode([i for i, m in zip(ids, mask) if not m])
    assert unmasked.count("<|im_start|>assistant\n") == 3 and "84</tool_response>" in unmasked
    assert "You are Berry." in unmasked and "Thanks!" in unmasked


def test_sft_pack_keeps_masks_aligned(tokenizer):
    """Each packed row holds whole examples in order, then padding; its loss-masked ids are exactly the
    assistant ids of those examples, concatenated (a mask shifted against its tokens would train other ids)."""
    convos = [CONVO[:3], CONVO[:5], CONVO, CONVO[3:5], CONVO[:3], CONVO[5:]]
    ex = [encode_with_mask(tokenizer, c) for c in convos]
    row_len = max(len(ids) for ids, _ in ex) + len(ex[3][0])  # room for a long example and a short one
    pad = tokenizer.endoftext_id
    rows, masks = pack(ex, row_len, pad)
    assert rows.shape == masks.shape == (len(rows), row_len) and len(rows) < len(ex)  # some rows hold several
    i = 0
    for r, m in zip(rows.tolist(), masks.tolist()):
        pos, mine = 0, []
        while i < len(ex) and r[pos:pos + len(ex[i][0])] == ex[i][0]:  # the next example starts here
            mine.append(ex[i])
            pos += len(ex[i][0])
            i += 1
        assert mine, "a row that starts with no example"
        assert r[pos:] == [pad] * (row_len - pos) and not any(m[pos:])  # then only padding, never trained
        assert m[:pos] == [b for _, mask in mine for b in mask]
        assert [t for t, b in zip(r, m) if b] == [t for ids, mask in mine for t, b in zip(ids, mask) if b]
    assert i == len(ex)  # every example, once, in order
    assert int(masks.sum()) == sum(sum(mk) for _, mk in ex)


def test_sft_trains_on_every_token_of_text_records(tokenizer, tmp_path):

    text = "Plain text is trained on every token. " * 150
    data = tmp_path / "mix.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [{"messages": CONVO}] * 3 + [{"text": text}]) + "\n")
    batches = ChatBatches([str(data)], tokenizer, seq_len=256, micro_batch=2, val_fraction=0.01)
    assert batches.stats["conversations"] == 3 and batches.stats["text_documents"] == 1
    convo_loss = sum(encode_with_mask(tokenizer, CONVO)[1])
    n_text = len(tokenizer.encode(text)) + 1  # and <|endoftext|>
    assert n_text > 257 and len(encode_with_mask(tokenizer, CONVO)[0]) <= 257
    # one record went to val; the text is cut into pieces of at most 257 tokens, all trained on
    total = int(batches.masks.sum()) + int(batches.val_masks.sum())
    assert total == 3 * convo_loss + n_text
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 5}\n')
    with pytest.raises(ValueError, match="expected a JSON object with \"messages\" or \"text\""):
        ChatBatches([str(bad)], tokenizer, seq_len=64, micro_batch=2)


def test_sft_batches_are_shifted_masked_rows_visited_once_per_epoch(tokenizer, tmp_path):
    """get(step, micro): inputs are a row without its last token, targets the row without its first, -1 where the
    next token is not trained; each epoch visits every row once, in an order that depends on (seed, epoch) only.
    (micro_batch 1: a micro-batch that straddles two epochs takes its rows from the first epoch's order.)"""

    data = tmp_path / "chat.jsonl"
    convos = [[{"role": "user", "content": f"What is {a} plus {a}?"},
               {"role": "assistant", "content": f"{a} plus {a} is {2 * a}."}] for a in range(1, 31)]
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convos))
    b = ChatBatches([str(data)], tokenizer, seq_len=64, micro_batch=1, seed=3, val_fraction=0.1)
    b.accum = 2
    n = len(b.rows)
    assert n >= 4 and len(b.val_rows) >= 1 and b.stats["train_rows"] == n
    seen = []
    for step in range(n):  # two epochs of 2 rows per step
        for micro in range(2):
            x, y = b.get(step, micro)
            assert x.shape == y.shape == (1, 64)
            for xi, yi in zip(x.tolist(), y.tolist()):
                (r,) = [i for i in range(n) if b.rows[i, :-1].tolist() == xi]
                seen.append(r)
                want = [int(t) if m else -1 for t, m in zip(b.rows[r, 1:], b.masks[r, 1:])]
                assert yi == want
    assert sorted(seen[:n]) == list(range(n)) and sorted(seen[n:2 * n]) == list(range(n))
    assert seen[:n] != seen[n:2 * n]  # a fresh order each epoch
    again = ChatBatches([str(data)], tokenizer, seq_len=64, micro_batch=1, seed=3, val_fraction=0.1)
    again.accum = 2
    assert torch.equal(again.get(5, 1)[0], b.get(5, 1)[0])  # a batch is a function of its step
    (vx, vy), *_ = b.val_batches()
    assert torch.equal(vx, torch.from_numpy(b.val_rows[:1, :-1]))
