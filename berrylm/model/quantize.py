"""Quantized CPU inference: int8 weights x int8 activations, exact int32 accumulation (`torch._int_mm`, oneDNN).

    quantize(model, "int8")   after `fuse_for_inference`: every matmul of a decode step runs in int8 -- the fused
                              q|k|v(|g) and gate|up projections, wo, w_down, the mini-experts and the lm_head
    choose_mode(model)        "auto": time this model's decode-step matmuls on this machine in float32 and int8,
                              keep int8 where it wins by 10%; returns the mode and a line saying why

Int8Linear: W [N, K] is stored as int8 with one fp32 scale per output row (symmetric, absmax / 127); at run time
each activation row (token) x [K] gets its own scale (absmax / 127) and is rounded to int8, the int8 x int8 product
is accumulated exactly in int32, and y = acc * x_scale[row] * w_scale[col]. Per-token scales make a token's output
independent of what else is in the batch (batched decode == one sequence at a time, exactly), and an outlier
token only coarsens its own row. The attention itself (scores, softmax, KV cache) stays in float.
The float weights of quantized layers are dropped (set to empty tensors), so a quantized model cannot be trained,
exported or re-quantized; load it again for that.
"""

from __future__ import annotations

import time
from functools import partial

import torch
import torch.nn as nn

MODES = ("none", "int8")


class Int8Linear(nn.Module):
    """y = x @ W.T for float x [..., K]; W [N, K] held as int8 rows with fp32 scales."""

    def __init__(self, weight: torch.Tensor, in_scale: torch.Tensor | None = None, rows: int = 4096):
        """weight [N, K]; in_scale [K]: quantize weight * in_scale instead (SmoothQuant's column scales). Works
        `rows` rows at a time, so the float temporaries stay small next to a large lm_head."""
        super().__init__()
        N, K = weight.shape
        q = torch.empty(N, K, dtype=torch.int8)
        scale = torch.empty(N)
        for i in range(0, N, rows):
            w = weight[i:i + rows].detach().float()
            if in_scale is not None:
                w = w * in_scale
            scale[i:i + rows] = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
            q[i:i + rows] = torch.round(w / scale[i:i + rows].unsqueeze(1)).clamp_(-127, 127)
        self.register_buffer("w_t", q.t(), persistent=False)  # [K, N] view of the row-major [N, K] (what _int_mm wants)
        self.register_buffer("w_scale", scale, persistent=False)
        self.in_features, self.out_features = K, N

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        if dtype != torch.float32:
            x2 = x2.float()
        s = x2.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12).div_(127.0)  # [M, 1]
        xq = x2.div(s).round_().to(torch.int8)  # |x / s| <= 127 by construction
        y = torch._int_mm(xq, self.w_t)  # [M, N] int32, exact
        y = torch.mul(y, s).mul_(self.w_scale)  # int32 * float32 -> float32 in one op
        y = y.view(*shape[:-1], self.out_features)
        return y if dtype == torch.float32 else y.to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 x int8 -> int32"


# SmoothQuant calibration text (written for this file): prose, dialogue, code and numbers, so that the
# activation channels that carry outliers in any text show them here too.
CALIBRATION = """The river ran high after three days of rain, and the ferry waited on the far bank until noon.
User: Can you help me plan a trip to the mountains next week? Assistant: Of course! How many days do you have,
and do you prefer hiking or a quiet cabin? 1. Pack warm layers. 2. Check the forecast. 3. Tell someone your route.
def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0
In 1969, 600 million people watched the landing; the module carried 8,248 kg of fuel. 12 * 7 = 84, 3.14159.
Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside the leaves of green plants.
<tool_call>{"name": "calculator", "arguments": {"expression": "(17 + 25) / 6"}}</tool_call> The answer is 7.
Dear Ms. Chen, thank you for your letter of 4 March. We regret that the order cannot ship before Friday."""


class _AbsMax:
    """Stands in for a fused weight during calibration: records each input channel's max |x|, then x @ w.T."""

    def __init__(self, w: torch.Tensor):
        self.w, self.amax = w, torch.zeros(w.shape[1])

    def observe(self, x: torch.Tensor) -> None:
        self.amax = torch.maximum(self.amax, x.detach().abs().float().reshape(-1, x.shape[-1]).amax(0))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.observe(x)
        return torch.nn.functional.linear(x, self.w)


def _scales(amax: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel s = max|x|^alpha / max|w|^(1 - alpha): x / s and w * s even out."""
    wmax = torch.stack([w[i:i + 4096].abs().amax(0) for i in range(0, w.shape[0], 4096)]).amax(0)  # no |w| copy
    wmax = wmax.float().clamp(min=1e-5)
    return (amax.clamp(min=1e-5).pow(alpha) / wmax.pow(1 - alpha)).clamp(min=1e-5)


@torch.no_grad()
def smooth(model, ids: list[int], alpha: float = 0.5, copy_head: bool = True) -> torch.Tensor:
    """SmoothQuant (Xiao et al. 2023), in place on a fused float llama-style model: per input channel, divide the
    activation by s and multiply the weight column by s, so per-token int8 rounding of the activation no longer
    spends its range on a few outlier channels. Exact in float: 1/s goes into the RMSNorm weight before q|k|v,
    gate|up and the lm_head, into the up rows before w_down, and into the v rows before wo (softmax heads).
    The activations are those of `ids` in the float model, block by block (smooth_block). Returns the lm_head's
    column scales; copy_head=False leaves scaling the (tied) lm_head to the caller."""
    h, cos, sin = calibration_input(model, ids)
    for block in model.layers:
        h = smooth_block(block, h, cos, sin, alpha)
    return smooth_head(model, h, alpha, copy_head)


def calibration_input(model, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The float embedding of `ids` [1, T, d] and its RoPE cos/sin: what the first block sees."""
    from berrylm.model.transformer import rope_cos_sin

    with torch.inference_mode():
        h = model.tok_emb(torch.tensor([ids]))
        cos, sin = rope_cos_sin(torch.arange(len(ids)).unsqueeze(0), model.cfg.head_dim, model.cfg.rope_theta,
                                h.dtype)
    return h, cos, sin


@torch.no_grad()
def smooth_block(block, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant for one fused float block from the activations h [1, T, d] that reach it; returns the block's
    float output (computed before smoothing: what the next block sees in the float model)."""
    from berrylm.model.transformer import SwiGLU

    a, mlp = block.attn, block.mlp
    rec, hooks = {}, []
    a.w_fused = rec["qkv"] = _AbsMax(a.w_fused)
    if isinstance(mlp, SwiGLU):
        mlp.w_fused = rec["gate_up"] = _AbsMax(mlp.w_fused)
    for name, mod in (("wo", a.wo), ("down", getattr(mlp, "w_down", None))):
        if isinstance(mod, nn.Linear):
            rec[name] = _AbsMax(mod.weight)
            hooks.append(mod.register_forward_pre_hook(lambda m, x, r=rec[name]: r.observe(x[0])))
    try:
        with torch.inference_mode():
            out = block(h, cos, sin)
    finally:
        for hook in hooks:
            hook.remove()
        a.w_fused = rec["qkv"].w
        if "gate_up" in rec:
            mlp.w_fused = rec["gate_up"].w
    s = _scales(rec["qkv"].amax, a.w_fused, alpha)
    block.attn_norm.weight.div_(s)
    a.w_fused = a.w_fused * s
    if "gate_up" in rec:
        s = _scales(rec["gate_up"].amax, mlp.w_fused, alpha)
        block.mlp_norm.weight.div_(s)
        mlp.w_fused = mlp.w_fused * s
        s = _scales(rec["down"].amax, mlp.w_down.weight, alpha)
        hid = mlp.w_down.weight.shape[1]
        mlp.w_fused[hid:] /= s.unsqueeze(1)  # the up rows: silu(g) * u / s
        mlp.w_down.weight.mul_(s)
    if a.n_soft and not a.n_lin:  # o = softmax(.) v per head: v / s gives o / s; one s per kv head's channels
        hd, g = a.hd, a.n_soft // a.n_kv
        amax = rec["wo"].amax.view(a.n_kv, g, hd).amax(1)  # [Hkv, hd]
        wmax = a.wo.weight.abs().amax(0).view(a.n_kv, g, hd).amax(1)
        s = (amax.clamp(min=1e-5).pow(alpha) / wmax.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)
        v0 = a.splits[0] + a.splits[1]
        a.w_fused[v0:v0 + a.n_kv * hd] /= s.reshape(-1, 1)
        a.wo.weight.mul_(s.unsqueeze(1).expand(a.n_kv, g, hd).reshape(1, -1))
    return out


@torch.no_grad()
def smooth_head(model, h: torch.Tensor, alpha: float, copy_head: bool = True) -> torch.Tensor:
    """SmoothQuant for the lm_head from the last block's float output h; returns its column scales."""
    with torch.inference_mode():
        amax = model.norm(h).abs().float().reshape(-1, h.shape[-1]).amax(0)
    s = _scales(amax, model.lm_head.weight, alpha)
    model.norm.weight.div_(s)
    if copy_head:
        w = model.lm_head.weight
        model.lm_head = nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=False)
        model.lm_head.weight = nn.Parameter(w * s, requires_grad=False)  # a copy: tok_emb stays as is
    return s


def _drop(*mods: nn.Module) -> None:
    """Free the float weights a quantized layer replaced (keeps a 0-element tensor of the same dtype)."""
    for m in mods:
        m.weight = nn.Parameter(m.weight.new_empty(0), requires_grad=False)


class Quantizer:
    """Quantizes a fused model one block at a time, so a loader can hand over each block as soon as its weights are
    read (export/gguf_reader.py: load_gguf(each_block=...)) and the float model never exists whole:

        q = Quantizer("int8", calibration_ids)
        q.begin(model)             # the embedding is loaded
        q.block(model, i)          # block i is loaded and fused: SmoothQuant from the float activations, then int8
        q.end(model)               # the final norm and lm_head are loaded

    The result is the same as quantize(model, ...) after a whole-model load (tests/test_quantize.py)."""

    def __init__(self, mode: str, calibration_ids: list[int] | None = None, alpha: float = 0.5):
        if mode not in MODES:
            raise ValueError(f"unknown quantize mode '{mode}' (choose from {', '.join(MODES)}, or auto)")
        self.mode, self.ids, self.alpha = mode, calibration_ids, alpha
        self.h = self.cos = self.sin = None

    def begin(self, model) -> None:
        if self.mode == "none":
            return
        if model.tok_emb.weight.device.type != "cpu":
            raise ValueError("--quantize int8 runs on CPU (torch._int_mm through oneDNN); use --device cpu")
        if self.ids:
            self.h, self.cos, self.sin = calibration_input(model, self.ids)

    def block(self, model, i: int) -> None:
        if self.mode == "none":
            return
        from berrylm.model.transformer import MiniExperts, SwiGLU

        block = model.layers[i]
        if block.attn.w_fused is None:
            raise ValueError("quantize() expects a model after fuse_for_inference()")
        if self.h is not None:
            self.h = smooth_block(block, self.h, self.cos, self.sin, self.alpha)
        a = block.attn
        a.w_fused = Int8Linear(a.w_fused)
        a.wo = _swap(a.wo)
        _drop(*[m for m in (a.wq, a.wk, a.wv, a.wg) if m is not None])
        mlp = block.mlp
        if isinstance(mlp, SwiGLU):
            mlp.w_fused = Int8Linear(mlp.w_fused)
            mlp.w_down = _swap(mlp.w_down)
            _drop(mlp.w_gate, mlp.w_up)
        elif isinstance(mlp, MiniExperts):
            mlp.quantize()

    def end(self, model) -> None:
        if self.mode == "none":
            return
        head_scale = smooth_head(model, self.h, self.alpha, copy_head=False) if self.h is not None else None
        # tied: tok_emb keeps its float table for the embedding lookup
        model.lm_head = Int8Linear(model.lm_head.weight, head_scale)
        model.quantized = self.mode
        self.h = self.cos = self.sin = None


def quantize(model, mode: str, calibration_ids: list[int] | None = None, alpha: float = 0.5):
    """Quantize a fused (fuse_for_inference) Transformer in place; returns it. mode: none | int8.
    calibration_ids: token ids of CALIBRATION (the model's tokenizer) for SmoothQuant; None skips smoothing."""
    q = Quantizer(mode, calibration_ids, alpha)
    if mode == "none":
        return model
    if any(b.attn.w_fused is None for b in model.layers):
        raise ValueError("quantize() expects a model after fuse_for_inference()")
    q.begin(model)  # refuses a model that is not on the CPU
    for i in range(len(model.layers)):
        q.block(model, i)
    q.end(model)
    return model


def _swap(linear: nn.Linear) -> Int8Linear:
    return Int8Linear(linear.weight)


def _median_ms(fn, x: torch.Tensor, reps: int) -> float:
    fn(x)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


@torch.inference_mode()
def choose_mode(model, batches: tuple[int, ...] = (1, 16), reps: int = 5) -> tuple[str, str]:
    """For --quantize auto, on a fused float model: (mode, reason). Times the matmuls of one decode step (one
    layer's weights x n_layers, plus the lm_head) in float and in int8 on this machine, at batch 1 and 16, and picks
    int8 where it takes at most 0.9x the float time. Costs one layer's int8 copy and well under a second."""
    w = model.tok_emb.weight
    if w.device.type != "cpu" or w.dtype != torch.float32:
        return "none", "auto: int8 is for float32 models on CPU"
    a, mlp = model.layers[0].attn, model.layers[0].mlp
    layer = [a.w_fused, a.wo.weight]
    if getattr(mlp, "w_fused", None) is not None:  # SwiGLU (the mini-experts are timed through attention alone)
        layer += [mlp.w_fused, mlp.w_down.weight]
    try:
        q_layer, q_head = [Int8Linear(x) for x in layer], Int8Linear(model.lm_head.weight)
    except RuntimeError as e:  # a torch build without int8 matmuls on this CPU
        return "none", f"auto: int8 unavailable here ({e})"
    t = {"float": 0.0, "int8": 0.0}
    for b in batches:
        x = torch.randn(b, w.shape[1])
        t["float"] += _median_ms(model.lm_head, x, reps)
        t["int8"] += _median_ms(q_head, x, reps)
        for wf, wq in zip(layer, q_layer):
            xi = torch.randn(b, wf.shape[1])
            t["float"] += len(model.layers) * _median_ms(partial(torch.nn.functional.linear, weight=wf), xi, reps)
            t["int8"] += len(model.layers) * _median_ms(wq, xi, reps)
    mode = "int8" if t["int8"] <= 0.9 * t["float"] else "none"
    return mode, (f"auto: the matmuls of a decode step at batch {' and '.join(map(str, batches))} took "
                  f"{t['int8']:.1f} ms in int8 vs {t['float']:.1f} ms in float32 here")
