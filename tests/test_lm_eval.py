"""lm-evaluation-harness (the PyPI `lm-eval`, its `local-completions` model) against `berry serve`: a 200-question
multiple-choice task whose data ships in the repo (berrylm/train/evals/berry_arith), scored through /v1/completions
(several token-id prompts per request, echo + logprobs, max_tokens 1) with lm-eval's remote tokenizer (/tokenize,
/detokenize, /tokenizer_info). Its accuracy, and every choice's log-likelihood, equal the in-process computation
of `berry eval --choices` (berry-chat is at chance on this task, 0.21: it learned to call a calculator, not to
add; the test is about the numbers agreeing, not about them being good)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import openai

from berrylm.model.checkpoint import load_checkpoint
from berrylm.train.choice_eval import choice_accuracy, context_of, encode_pair, loglikelihood, read_records

TASK = Path(__file__).resolve().parent.parent / "berrylm" / "train" / "evals" / "berry_arith"


def test_lm_eval_accuracy_equals_in_process(api_server, tmp_path):
    base = api_server[0]
    work = tmp_path / "task"
    shutil.copytree(TASK, work)  # lm-eval reads data_files relative to its working directory
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "OPENAI_API_KEY": "none", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
           f"model=berry-chat,base_url={base}/v1/completions,tokenizer_backend=remote,tokenized_requests=True,"
           "num_concurrent=1,max_retries=1,max_length=512", "--tasks", "berry_arith", "--include_path", str(work),
           "--batch_size", "16", "--output_path", str(tmp_path / "out"), "--log_samples"]
    r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (result,) = list((tmp_path / "out").rglob("results_*.json"))
    got = json.loads(result.read_text())["results"]["berry_arith"]
    model, tok = load_checkpoint("berry-chat")
    want = choice_accuracy(model.eval().float(), tok, read_records(TASK / "berry_arith.jsonl"))
    print(f"lm-eval acc {got['acc,none']:.4f} acc_norm {got['acc_norm,none']:.4f}; in-process acc {want['acc']:.4f} "
          f"acc_norm {want['acc_norm']:.4f} ({want['n']} records)")
    assert abs(got["acc,none"] - want["acc"]) <= 1 / want["n"] + 1e-9
    assert abs(got["acc_norm,none"] - want["acc_norm"]) <= 1 / want["n"] + 1e-9
    # not only the same totals: every choice's log-likelihood over HTTP is the in-process one
    (samples,) = list((tmp_path / "out").rglob("samples_berry_arith_*.jsonl"))
    recs = read_records(TASK / "berry_arith.jsonl")
    checked = 0
    for line in samples.read_text().splitlines():
        s = json.loads(line)
        rec = recs[s["doc_id"]]
        for choice, resp in zip(rec["choices"], s["filtered_resps"]):
            ctx, cont = encode_pair(tok, context_of(rec), " " + choice)
            assert abs(float(resp[0]) - loglikelihood(model, ctx, cont)) < 1e-3
            checked += 1
    assert checked == 4 * len(recs)


def test_completions_echo_logprobs_list_prompts_and_refusals(api_server):
    base = api_server[0] + "/v1/completions"
    c = httpx.post(base, json={"model": "berry-chat", "prompt": ["One plus", "Two times three"], "max_tokens": 0,
                               "echo": True, "logprobs": 2}, timeout=60).json()
    assert [ch["index"] for ch in c["choices"]] == [0, 1] and c["usage"]["completion_tokens"] == 0
    for ch, text in zip(c["choices"], ["One plus", "Two times three"]):
        lp = ch["logprobs"]
        assert ch["text"] == text and "".join(lp["tokens"]) == text and ch["finish_reason"] == "length"
        assert lp["token_logprobs"][0] is None and all(x < 0 for x in lp["token_logprobs"][1:])
        assert all(len(t) == 2 for t in lp["top_logprobs"][1:]) and lp["text_offset"][0] == 0
    # echo + max_tokens 1: the prompt's logprobs, then the generated token's; n=2 per prompt numbers 0..3
    c = httpx.post(base, json={"model": "berry-chat", "prompt": [[5, 6, 7], [8, 9]], "max_tokens": 1, "n": 2,
                               "echo": True, "logprobs": 1, "temperature": 0}, timeout=60).json()
    assert [ch["index"] for ch in c["choices"]] == [0, 1, 2, 3]
    assert [len(ch["logprobs"]["tokens"]) for ch in c["choices"]] == [4, 4, 3, 3]
    assert c["usage"]["prompt_tokens"] == 5
    # streamed: the same numbering, each choice's echo first
    c = openai.OpenAI(base_url=api_server[0] + "/v1", api_key="none", max_retries=0)
    text = {}
    for chunk in c.completions.create(model="berry-chat", prompt=["One plus", "Two"], max_tokens=3, echo=True,
                                      temperature=0, stream=True):
        for ch in chunk.choices:
            text[ch.index] = text.get(ch.index, "") + ch.text
    solo = [c.completions.create(model="berry-chat", prompt=p, max_tokens=3, echo=True, temperature=0).choices[0].text
            for p in ("One plus", "Two")]
    assert [text[0], text[1]] == solo and solo[0].startswith("One plus")
    for body, param in (({"suffix": "x"}, "suffix"), ({"best_of": 3}, "best_of"),
                        ({"max_tokens": 0}, "max_tokens")):
        r = httpx.post(base, json={"model": "berry-chat", "prompt": "x", **body}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param
    r = httpx.post(api_server[0] + "/v1/chat/completions", json={
        "model": "berry-chat", "messages": [{"role": "user", "content": "x"}], "audio": {"voice": "x"}}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "audio"
