"""The onnxruntime backend: serves an ONNX export (export/onnx_export.py) through the same engine.

The exported graph takes the cache as explicit tensors (optimum / onnxruntime-genai names):

    in   input_ids [B, T], attention_mask [B, P+T], position_ids [B, T]         int64
         past_key_values.N.key / .value [B, Hkv, P, hd]                           softmax heads
         past_linear_state.N.S [B, Hl, hd, hd], .z [B, Hl, hd]                    hybrid linear heads
    out  logits [B, T, V], present.N.key / .value [B, Hkv, P+T, hd], present_linear_state.N.S / .z

The engine hands `forward` a serve.kv_cache.PagedBatch whose rows have different cached lengths starts[b].
Each row's past is gathered from the paged pool into a [B, Hkv, P = max(starts), hd] array, RIGHT-padded:

    key index   0 .. starts[b]-1 | starts[b] .. P-1 | P .. P+T-1
    content     row b's past     | padding (mask 0) | the T new tokens

The graph's mask is causal over the concatenation (new token t sees keys <= P+t) AND attention_mask, so each
new token sees exactly its own past and the new tokens before it; RoPE follows position_ids (= starts[b]+t),
not the key index. Right-padded new tokens (prefill groups) come after the real ones, so no real token sees
them, and PagedBatch routes their K/V to the scratch block. The T new K/V slices of present.* go back into
the pool through PagedBatch's write indices; the hybrid's recurrent states go back into their slots.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from berrylm.model.config import ModelConfig
from berrylm.serve.backend import Backend


def is_onnx_export(path: Path) -> bool:
    return path.is_dir() and (path / "model.onnx").is_file()


def export_config(genai: dict, inputs: dict[str, list]) -> ModelConfig:
    """The cache geometry the engine needs, from genai_config.json and the graph's input shapes. Fields the
    graph hides (MLP sizes, experts, gates) keep ModelConfig's defaults: the engine does not use them."""
    m = genai["model"]
    d = m["decoder"]
    lin = inputs.get("past_linear_state.0.S")
    n_linear = lin[1] if lin and isinstance(lin[1], int) else 0
    return ModelConfig(name=m.get("type", "onnx"), vocab_size=int(m["vocab_size"]), dim=int(d["hidden_size"]),
                       n_layers=int(d["num_hidden_layers"]), n_heads=int(d["num_attention_heads"]),
                       n_kv_heads=int(d["num_key_value_heads"]), head_dim=int(d["head_size"]),
                       max_seq_len=int(m["context_length"]), n_linear_heads=n_linear,
                       head_gate=m.get("type") == "strawberry" and n_linear == 0)  # keeps cfg.arch right


class OnnxBackend(Backend):
    def __init__(self, export_dir: str | Path, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ValueError("--backend onnx needs onnxruntime (pip install onnxruntime)") from None

        from berrylm.model.tokenizer import Tokenizer

        path = Path(export_dir)
        if not is_onnx_export(path):
            raise ValueError(f"{path}: not an ONNX export (expected a directory with model.onnx; "
                             "make one with `berry export CKPT --to onnx --out DIR`)")
        try:
            genai = json.loads((path / "genai_config.json").read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}/genai_config.json: unreadable ({str(e).splitlines()[0]})") from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for a bad graph
            raise ValueError(f"{path}/model.onnx: onnxruntime cannot load it ({str(e).splitlines()[0]})") from None
        shapes = {i.name: i.shape for i in self.session.get_inputs()}
        try:
            self.cfg = export_config(genai, shapes)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}/genai_config.json: missing or bad model fields ({e})") from None
        self.tokenizer = Tokenizer.load(path)
        self.device, self.dtype, self.name = torch.device("cpu"), torch.float32, path.name
        n = self.cfg.n_layers
        self.n_soft = sum(f"past_key_values.{i}.key" in shapes for i in range(n))
        self.n_lin = sum(f"past_linear_state.{i}.S" in shapes for i in range(n))
        self.out_names = [o.name for o in self.session.get_outputs()]

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V] float32; cache is a PagedBatch."""
        B, T = tokens.shape
        pos = cache.positions(T).cpu()  # [B, T]
        starts = pos[:, 0]  # [B] tokens already cached per row
        P = int(starts.max())
        valid = torch.arange(P).unsqueeze(0) < starts.unsqueeze(1)  # [B, P] real past keys
        mask = torch.cat([valid, torch.ones(B, T, dtype=torch.bool)], 1)  # [B, P+T]
        feeds = {"input_ids": tokens.cpu().to(torch.int64).numpy(), "attention_mask": mask.to(torch.int64).numpy(),
                 "position_ids": pos.to(torch.int64).numpy()}
        for i in range(self.n_soft):
            k, v = cache.past_kv(i, P)  # [B, Hkv, P, hd] each; padding slots hold other rows' data
            keep = valid[:, None, :, None]
            feeds[f"past_key_values.{i}.key"] = k.float().masked_fill(~keep, 0).numpy()
            feeds[f"past_key_values.{i}.value"] = v.float().masked_fill(~keep, 0).numpy()
        for i in range(self.n_lin):
            S, z = cache.pool.S[i][cache.slots], cache.pool.z[i][cache.slots]  # [B, Hl, hd, hd], [B, Hl, hd]
            feeds[f"past_linear_state.{i}.S"] = S.numpy()
            feeds[f"past_linear_state.{i}.z"] = z.numpy()
        outs = dict(zip(self.out_names, self.session.run(None, feeds)))
        for i in range(self.n_soft):
            k_new = torch.from_numpy(outs[f"present.{i}.key"][:, :, P:])  # [B, Hkv, T, hd]
            v_new = torch.from_numpy(outs[f"present.{i}.value"][:, :, P:])
            cache.write_kv(i, k_new.transpose(1, 2), v_new.transpose(1, 2))
        for i in range(self.n_lin):
            cache.pool.S[i][cache.slots] = torch.from_numpy(outs[f"present_linear_state.{i}.S"])
            cache.pool.z[i][cache.slots] = torch.from_numpy(outs[f"present_linear_state.{i}.z"])
        return torch.from_numpy(outs["logits"])
