"""`--verify`: run an export in its real runtime and compare with our PyTorch model on a fixed prompt set.

Each check returns (max |delta logits|, top-1 agreement over every compared position, greedy continuations
identical, total continuations).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from berrylm.model.cache import KVCache
from berrylm.model.generate import generate
from berrylm.model.tokenizer import Tokenizer
from berrylm.model.transformer import Transformer

PROMPTS = ["Once upon a time", "The cat sat on the mat.", "What is 12*7?", "Hello, how are you today?",
           "A tiny model answers", "1 2 3 4 5 6", "Café naïve — 東京 🍓", "The quick brown fox",
           "In the beginning", "Tell me a story about a berry."]


def prompt_ids(tok: Tokenizer, n: int = len(PROMPTS)) -> list[list[int]]:
    chats = [tok.encode_chat([{"role": "user", "content": p}], add_generation_prompt=True) for p in PROMPTS[:n // 2]]
    return chats + [tok.encode(p) for p in PROMPTS[n // 2:n]]


def greedy(model: Transformer, ids: list[int], n: int) -> list[int]:
    """Our model's greedy continuation of ids, n tokens (the one offline decode loop)."""
    return generate(model, ids, n, max_len=len(ids) + n)[0]


@torch.no_grad()
def ours_logits(model: Transformer, ids: list[int]) -> np.ndarray:
    return model(torch.tensor([ids]))[0].numpy()


def check_transformers(model, tok, path: Path, n_new: int = 64) -> tuple[float, float, int, int]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    worst, same, agree = 0.0, 0, []
    prompts = prompt_ids(tok)
    for ids in prompts:
        with torch.no_grad():
            theirs = hf(torch.tensor([ids])).logits[0].float().numpy()
            gen = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, eos_token_id=None,
                              pad_token_id=tok.endoftext_id)[0, len(ids):].tolist()
        ours = ours_logits(model, ids)
        worst = max(worst, float(np.abs(theirs - ours).max()))
        agree.append(theirs.argmax(-1) == ours.argmax(-1))
        same += gen == greedy(model, ids, n_new)
    return worst, float(np.concatenate(agree).mean()), same, len(prompts)


def check_llama_cpp(model, tok, gguf_file: Path, n_new: int = 64) -> tuple[float, float, int, int]:
    from llama_cpp import Llama

    llm = Llama(str(gguf_file), logits_all=True, type_k=0, type_v=0, n_threads=2, verbose=False,
                n_ctx=min(model.cfg.max_seq_len, 512))
    worst, same, agree = 0.0, 0, []
    prompts = prompt_ids(tok)
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        theirs = np.array(llm.scores[:len(ids)])
        ours = ours_logits(model, ids)
        worst = max(worst, float(np.abs(theirs - ours).max()))
        agree.append(theirs.argmax(-1) == ours.argmax(-1))
        gen = []
        for _ in range(n_new):
            gen.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([gen[-1]])
        same += gen == greedy(model, ids, n_new)
    return worst, float(np.concatenate(agree).mean()), same, len(prompts)


def check_onnx(model, tok, path: Path, n_new: int = 16, batch: int = 2) -> tuple[float, float, int, int]:
    """Prefill a batch of equal-length prompts, then n_new cached decode steps, logits compared every step."""
    import onnxruntime as ort

    from berrylm.export.onnx_export import empty_past, io_names

    sess = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    names_in, _ = io_names(model.cfg)
    prompts = prompt_ids(tok)
    T = min(len(p) for p in prompts)
    worst, same, agree = 0.0, 0, []
    for b0 in range(0, len(prompts) - batch + 1, batch):
        ids = torch.tensor([p[:T] for p in prompts[b0:b0 + batch]])
        cache = KVCache(model.cfg, batch, T + n_new + 1)
        past = [x.numpy() for x in empty_past(model.cfg, batch)]
        x, pos, gen_ours, gen_theirs = ids, 0, [], []
        for _ in range(n_new + 1):
            with torch.no_grad():
                ref = model(x, cache=cache).numpy()
            Tn = x.shape[1]
            feed = [x.numpy(), np.ones((batch, pos + Tn), np.int64), np.arange(pos, pos + Tn)[None].repeat(batch, 0)]
            outs = sess.run(None, dict(zip(names_in, feed + past)))
            worst = max(worst, float(np.abs(outs[0] - ref).max()))
            agree.append((outs[0].argmax(-1) == ref.argmax(-1)).ravel())
            past, pos = outs[1:], pos + Tn
            gen_ours.append(ref[:, -1].argmax(-1))
            gen_theirs.append(outs[0][:, -1].argmax(-1))
            x = torch.from_numpy(gen_ours[-1][:, None])
        same += int((np.stack(gen_ours) == np.stack(gen_theirs)).all(0).sum())
    return worst, float(np.concatenate(agree).mean()), same, (len(prompts) // batch) * batch


def table(rows: list[tuple[str, float, float, int, int]]) -> str:
    lines = ["| runtime | max abs dlogits | top-1 agreement | greedy continuations identical |", "|---|---|---|---|"]
    lines += [f"| {name} | {d:.3g} | {a:.1%} | {s}/{n} |" for name, d, a, s, n in rows]
    return "\n".join(lines)
