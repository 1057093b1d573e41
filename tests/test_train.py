"""The training loop: it learns, its LR schedule, exact resume after a crash, DDP == one process, atomic
checkpoints, reports, the SFT assistant mask, the tokenizer command, and `berry eval`'s pieces."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import berrylm.cli as berry
from berrylm.model.checkpoint import load_checkpoint, load_train_state
from berrylm.train.optim import build_optimizers, lr_at
from berrylm.train.pretrain import ShardBatches
from berrylm.train.report import read_log
from berrylm.train.trainer import TrainConfig, Trainer
from tests.conftest import fixture_texts, make_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, ffn_dim=64, max_seq_len=64)
TINY_SET = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tokenizer) -> Path:
    """train.bin / val.bin / meta.json in the data engineer's format, from the fixture corpus."""
    d = tmp_path_factory.mktemp("shards")
    tokenizer.save(d / "tok")
    texts = fixture_texts()
    meta = {"dtype": "uint16", "vocab_size": tokenizer.vocab_size, "tokenizer": str(d / "tok"), "sources": {}}
    for split, docs in (("train", texts[2:]), ("val", texts[:2])):
        ids = [i for t in docs for i in tokenizer.encode(t) + [tokenizer.endoftext_id]]
        np.array(ids, dtype=np.uint16).tofile(d / f"{split}.bin")
        meta[f"{split}_tokens"] = len(ids)
        meta[f"{split}_bytes"] = sum(len(t.encode()) for t in docs)
    (d / "meta.json").write_text(json.dumps(meta))
    return d


def tiny_cfg(out: Path, **kw) -> TrainConfig:
    base = dict(out=str(out), overrides=TINY, steps=8, batch_tokens=256, seq_len=32, micro_batch=4, lr=3e-3,
                warmup=2, eval_every=4, ckpt_every=3, sample_every=100, log_every=1, val_tokens=512, threads=1)
    return TrainConfig(**{**base, **kw})


def run_tiny(shards: Path, tokenizer, cfg: TrainConfig, data=None) -> Trainer:
    data = data or ShardBatches(shards, cfg.seq_len, cfg.micro_batch, cfg.seed)
    trainer = Trainer(cfg, data, tokenizer, {"train_tokens": data.meta["train_tokens"]})
    trainer.run()
    return trainer


def step_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(run_dir / "log.jsonl") if "loss" in r}


class CrashAt:
    """Shard batches that fail when step `at` asks for its data: a training process dying mid-run."""

    def __init__(self, data: ShardBatches, at: int):
        self.data, self.at = data, at

    def get(self, step: int, micro: int):
        if step == self.at:
            raise RuntimeError("simulated crash")
        return self.data.get(step, micro)

    def __getattr__(self, name):
        return getattr(self.data, name)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, shards, tokenizer) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    run_tiny(shards, tokenizer, tiny_cfg(out))
    return out


def test_lr_schedule_shape():
    total, warm = 100, 10
    cos = [lr_at(s, total, warm, 0.1, "cosine") for s in range(total)]
    lin = [lr_at(s, total, warm, 0.1, "linear") for s in range(total)]
    assert cos[0] == pytest.approx(0.1) and cos[warm - 1] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(cos[:warm], cos[1:warm]))  # warmup rises
    assert all(a >= b for a, b in zip(cos[warm:], cos[warm + 1:]))  # then only decays
    assert lr_at(total, total, warm, 0.1, "cosine") == pytest.approx(0.1)  # ends at min_lr_frac
    assert lr_at(total, total, warm, 0.1, "linear") == pytest.approx(0.1)
    mid = warm + (total - warm) // 2
    assert cos[mid] == pytest.approx(0.55, abs=1e-6) and lin[mid] == pytest.approx(0.55, abs=1e-6)
    assert cos[warm + 10] > lin[warm + 10]  # cosine stays high longer than linear at first
    assert lr_at(50, total, warm, 0.1, "constant") == 1.0
    with pytest.raises(ValueError):
        lr_at(50, total, warm, 0.1, "exponential")


def test_optimizer_groups():
    from berrylm.model.config import get_preset
    from berrylm.model.transformer import Transformer

    model = Transformer(get_preset("berry-1.8m", **TINY, vocab_size=128))
    (adamw,) = build_optimizers(model, "adamw", 1e-3, 0.1)
    decay, no_decay = adamw.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.ndim == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no_decay["params"])
    adamw2, muon = build_optimizers(model, "muon", 1e-3, 0.1, muon_lr=0.02)
    muon_ids = {id(p) for p in muon.param_groups[0]["params"]}
    assert id(model.tok_emb.weight) not in muon_ids  # the tied embedding stays on AdamW
    assert id(model.layers[0].attn.wq.weight) in muon_ids
    n_all = sum(1 for _ in model.parameters())
    assert len(muon_ids) + sum(len(g["params"]) for g in adamw2.param_groups) == n_all


TINY_HYBRID = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=1, n_linear_heads=2, head_dim=16, ffn_dim=0,
                   expert_dim=32, max_seq_len=64)


@pytest.mark.parametrize("optimizer,preset", [("adamw", "berry-1.8m"), ("muon", "berry-1.8m"),
                                              ("adamw", "strawberry-1.8m")])
def test_overfits_a_tiny_batch(shards, tokenizer, tmp_path, optimizer, preset):
    data = ShardBatches(shards, 32, 4, seed=0)
    fixed = data.get(0, 0)
    data.get = lambda step, micro: fixed  # the same 4 sequences every step
    cfg = tiny_cfg(tmp_path / "run", steps=40, batch_tokens=128, warmup=5, decay="constant", optimizer=optimizer,
                   eval_every=1000, ckpt_every=1000, preset=preset,
                   overrides=TINY_HYBRID if preset.startswith("straw") else TINY)
    trainer = run_tiny(shards, tokenizer, cfg, data)
    assert trainer.model.cfg.is_llama == (preset == "berry-1.8m")
    losses = step_losses(tmp_path / "run")
    assert losses[1] > math.log(tokenizer.vocab_size) - 1.0  # starts near uniform
    assert losses[40] < 0.5 * losses[1], (losses[1], losses[40])


def test_report_log_and_checkpoint(reference_run, tokenizer):
    recs = read_log(reference_run / "log.jsonl")
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 9))
    evals = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert all(r["val_bpb"] > 0 for r in evals)
    assert any("samples" in r for r in recs)
    png = reference_run / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    report = (reference_run / "report.md").read_text()
    assert "val bpb" in report and "loss.png" in report and "train_tokens" in report
    model, tok = load_checkpoint(reference_run / "checkpoint")
    assert model.cfg.dim == 32 and tok.vocab_size == tokenizer.vocab_size
    state = load_train_state(reference_run / "checkpoint")
    assert state["step"] == 8 and state["tokens_seen"] == 8 * 256


def test_crash_and_resume_reproduce_the_loss_curve(reference_run, shards, tokenizer, tmp_path):
    out = tmp_path / "run"
    data = ShardBatches(shards, 32, 4, 0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_tiny(shards, tokenizer, tiny_cfg(out), CrashAt(data, 5))  # dies during step 6; checkpoint at 3
    assert load_train_state(out / "checkpoint")["step"] == 3
    assert max(step_losses(out)) == 5
    with pytest.raises(ValueError, match="--resume"):
        Trainer(tiny_cfg(out), data, tokenizer)
    run_tiny(shards, tokenizer, tiny_cfg(out, resume=True))
    ref, got = step_losses(reference_run), step_losses(out)
    assert sorted(got) == list(range(1, 9))
    assert got == ref  # bit-exact: same data, same optimizer state, same schedule
    assert load_train_state(out / "checkpoint")["tokens_seen"] == 8 * 256


def test_checkpoint_is_atomic_under_a_crash_while_saving(reference_run, shards, tokenizer, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def dying_save(obj, f, *a, **kw):
        calls.append(f)
        if len(calls) == 2:  # the second checkpoint (step 6) dies halfway: after the weights, in train_state
            Path(f).write_bytes(b"partial")
            raise OSError("disk full (simulated)")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="simulated"):
        run_tiny(shards, tokenizer, tiny_cfg(out))
    monkeypatch.setattr(torch, "save", real_save)
    # the checkpoint directory is still the complete step-3 one; the half-written one never took its place
    assert load_train_state(out / "checkpoint")["step"] == 3
    load_checkpoint(out / "checkpoint")
    assert [p.name for p in out.iterdir() if p.name.startswith("checkpoint")] == ["checkpoint"]
    run_tiny(shards, tokenizer, tiny_cfg(out, resume=True))
    assert step_losses(out) == step_losses(reference_run)


def test_ddp_two_processes_match_one(shards, tmp_path):
    common = ["train", "pretrain", "--data", str(shards), "--preset", "berry-1.8m", *TINY_SET, "--steps", "3",
              "--batch-tokens", "256", "--seq-len", "32", "--micro-batch", "4", "--warmup", "1", "--threads", "1",
              "--log-every", "1", "--eval-every", "100", "--sample-every", "100", "--ckpt-every", "100"]
    assert berry.main([*common, "--out", str(tmp_path / "one")]) == 0
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "berrylm", *common, "--out", str(tmp_path / "two")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world 2" in r.stdout
    report = (tmp_path / "two" / "report.md").read_text()
    assert "torchrun --standalone --nproc_per_node 2 berry.py train pretrain" in report
    one, two = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for s in one:
        assert two[s] == pytest.approx(one[s], abs=1e-5)
    assert one[3] != one[1]  # the weights did change between steps
    # each rank took only its share: the global batch (and tokens seen) is the same as one process's
    for run in ("one", "two"):
        assert load_train_state(tmp_path / run / "checkpoint")["tokens_seen"] == 3 * 256
    a, _ = load_checkpoint(tmp_path / "one" / "checkpoint")
    b, _ = load_checkpoint(tmp_path / "two" / "checkpoint")
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(x, y, atol=1e-5), k


def test_sft_end_to_end_learns_and_resumes(tokenizer, tmp_path):
    ckpt = make_checkpoint(tmp_path / "base", tokenizer, "berry-1.8m", **TINY)
    data = tmp_path / "chat.jsonl"
    convos = [[{"role": "user", "content": f"What is {a} plus {a}?"},
               {"role": "assistant", "content": f"{a} plus {a} is {2 * a}."}] for a in range(1, 41)]
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convos))
    args = ["train", "sft", "--data", str(data), "--init-from", str(ckpt), "--out", str(tmp_path / "sft"),
            "--steps", "30", "--batch-tokens", "256", "--seq-len", "64", "--micro-batch", "4", "--lr", "3e-3",
            "--warmup", "3", "--eval-every", "15", "--ckpt-every", "15", "--log-every", "1", "--threads", "1",
            "--val-fraction", "0.1"]
    assert berry.main(args) == 0
    recs = read_log(tmp_path / "sft" / "log.jsonl")
    losses = {r["step"]: r["loss"] for r in recs if "loss" in r}
    evals = [r["val_loss"] for r in recs if "val_loss" in r]
    assert losses[30] < 0.6 * losses[1] and evals[-1] < evals[0] * 1.01
    assert (tmp_path / "sft" / "report.md").exists()
    model, _ = load_checkpoint(tmp_path / "sft" / "checkpoint")
    assert model.cfg.dim == TINY["dim"]
    # resume of a finished run is a no-op that keeps its log
    assert berry.main(args + ["--resume"]) == 0
    assert {r["step"]: r["loss"] for r in read_log(tmp_path / "sft" / "log.jsonl") if "loss" in r} == losses


def test_train_tokenizer_command(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "docs.train.jsonl").write_text(
        "".join(json.dumps({"text": t, "source": "fixture"}) + "\n" for t in fixture_texts()))
    out = tmp_path / "tok"
    assert berry.main(["train", "tokenizer", "--data", str(corpus), "--vocab-size", "400", "--out", str(out)]) == 0
    from berrylm.model.tokenizer import Tokenizer

    tok = Tokenizer.load(out)
    assert tok.vocab_size == 400 and tok.im_end_id == 2
    assert tok.decode(tok.encode("Once upon a time, 1234.")) == "Once upon a time, 1234."
    assert berry.main(["train", "tokenizer", "--data", str(tmp_path / "nope"), "--vocab-size", "400",
                       "--out", str(out)]) == 1


def test_pretrain_cli_errors(shards, tmp_path, capsys):
    base = ["train", "pretrain", "--data", str(shards), "--out", str(tmp_path / "r"), "--steps", "1"]
    assert berry.main(base + ["--preset", "nope"]) == 1
    assert berry.main(base + ["--set", "dim"]) == 1
    assert berry.main(base[:-2]) == 1
    assert berry.main(["train", "pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--steps", "1"]) == 1
    err = capsys.readouterr().err
    assert "unknown preset" in err and "KEY=VALUE" in err and "--max-tokens" in err and "meta.json" in err
    assert "Traceback" not in err


# --- berry eval ---

def test_contains_number():
    from berrylm.train.eval import contains_number

    assert contains_number("12 times 7 is 84.", "84")
    assert not contains_number("It is 184.", "84") and not contains_number("It is 845", "84")
    assert not contains_number("It is 84.5", "84") and contains_number("84", "84")
    assert contains_number("The result is -3.", "-3")


def test_val_bpb_matches_definition(shards, reference_run):
    from berrylm.train.eval import val_bpb

    model, _ = load_checkpoint(reference_run / "checkpoint")
    r = val_bpb(model, str(shards), seq_len=32)
    meta = json.loads((shards / "meta.json").read_text())
    assert r["val_bpb"] == pytest.approx(r["val_loss"] * meta["val_tokens"] / (math.log(2) * meta["val_bytes"]))
    assert 0 < r["val_loss"] < math.log(meta["vocab_size"]) + 1


class Scripted(torch.nn.Module):
    """A real tiny Transformer whose choices are overridden to follow a script of token ids, recording every
    token it is fed: this checks the tool-round protocol of the eval loop, not the model's skill."""

    def __init__(self, inner, script: list[int]):
        super().__init__()
        self.inner, self.cfg, self.script, self.fed = inner, inner.cfg, list(script), []

    def forward(self, x, cache=None):
        self.fed += x[0].tolist()
        logits = self.inner(x, cache=cache)
        forced = torch.full_like(logits, -1e4)
        forced[0, -1, self.script.pop(0)] = 0.0
        return forced


def test_tool_accuracy_runs_the_calculator_round(tokenizer, llama_checkpoint):
    from berrylm.train.eval import tool_accuracy

    inner, _ = load_checkpoint(llama_checkpoint)
    question = [{"role": "user", "content": "What is 12 times 7?"}]
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "12*7"}}</tool_call>'
    script = tokenizer.encode(call) + tokenizer.encode("12 times 7 is 84.<|im_end|>")
    model = Scripted(inner, script)
    r = tool_accuracy(model, tokenizer, [{"messages": question, "expected": "84"}])
    assert r["accuracy"] == 1.0 and r["called_tool"] == 1.0
    full = question + [
        {"role": "assistant", "content": "",
         "tool_calls": [{"function": {"name": "calculator", "arguments": {"expression": "12*7"}}}]},
        {"role": "tool", "content": "84"}, {"role": "assistant", "content": "12 times 7 is 84."}]
    # the model saw exactly the rendered conversation: the result went back as the template's tool turn
    assert model.fed == tokenizer.encode_chat(full)[:len(model.fed)]
    assert tokenizer.decode(model.fed).endswith("<|im_start|>assistant\n12 times 7 is 84.")
    wrong = Scripted(inner, tokenizer.encode("It is 184.<|im_end|>"))
    assert tool_accuracy(wrong, tokenizer, [{"messages": question, "expected": "84"}])["accuracy"] == 0.0


def test_eval_cli(reference_run, shards, tmp_path, capsys):
    assert berry.main(["eval", str(reference_run / "checkpoint"), "--bpb", str(shards)]) == 0
    assert "val bpb" in capsys.readouterr().out
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"messages": [{"role": "user", "content": "What is 2 plus 2?"}], "expected": "4"})
                    + "\n")
    assert berry.main(["eval", str(reference_run / "checkpoint"), "--tool-accuracy", str(held)]) == 0
    assert "ALL" in capsys.readouterr().out
    assert berry.main(["eval", str(reference_run / "checkpoint")]) == 1


def test_train_config_roundtrip_in_state(reference_run):
    state = load_train_state(reference_run / "checkpoint")
    cfg = TrainConfig(**json.loads(state["train_config"]))
    assert replace(cfg, resume=False).steps == 8 and cfg.overrides == TINY


def test_resume_restores_rng_states(reference_run, shards, tokenizer):
    import random

    from berrylm.train.trainer import set_rng_state

    state = load_train_state(reference_run / "checkpoint")

    def draws():
        return torch.rand(3).tolist(), float(np.random.rand()), random.random()

    set_rng_state(state["rng"])
    expected = draws()
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    Trainer(tiny_cfg(reference_run, resume=True), ShardBatches(shards, 32, 4, 0), tokenizer)
    assert draws() == expected
