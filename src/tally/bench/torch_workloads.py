"""PyTorch workloads, random weights, no downloads. Imported only by the worker process.

Models are small hand-written torch.nn modules (BERT-like encoder, GPT-2-like
and GPT-Neo-like decoders, Llama-style decoder with RMSNorm/RoPE/GQA/static
KV cache, Whisper-like encoder-decoder, PointNet, YOLO-like detector) plus
torchvision's ResNet-50 (weights=None). Parameters are created directly on the
GPU (`with torch.device(...)`), so building a 1B-parameter model takes seconds.

Precision: inference runs bf16 weights and activations (what a server would
deploy; also keeps CUDA-graph capture free of autocast caches); training uses
AMP (bf16 autocast, fp32 master weights and optimizer state).

Variants: eager; compile (torch.compile, default mode; the compile happens in
the worker's warm-up); compile-triton (training only: torch.compile with
max-autotune restricted to Inductor's Triton GEMM and convolution templates,
so that matrix multiplications and forward convolutions become Triton kernels,
whose PTX block-level scheduling can slice, instead of cuBLAS/cuDNN kernels,
which have none; ExecuTorch's CUDA backend compiles the same way to avoid
libtorch's kernels. Backward convolutions and attention stay library kernels.
Autotuning makes the first compile take minutes); graph (inference only: the
request is captured once as a CUDA graph with static input/output buffers and
replayed per request).

HP requests run on a non-default stream created by the workload; with
TALLY_BENCH_HP_STREAM_PRIORITY=high (system mps-priority) that stream has the
device's greatest priority. step() returns after that stream synchronized.

TALLY_BENCH_TORCH_DEVICE=cpu builds and runs on the CPU (a developer aid for
checking shapes without a GPU; graph variants need CUDA).

cuDNN picks convolution algorithms by timing them (torch.backends.cudnn.benchmark),
as training scripts usually ask it to. Timed next to other work, or just on another
run, it can pick other algorithms, and a run's throughput moves with them:
TALLY_BENCH_CUDNN_BENCHMARK=0 takes cuDNN's heuristic choice instead, the same in
every process (for measuring small differences, e.g. benchmarks/gate_depth_cost.py).
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from tally.errors import TallyError

HP_STREAM_PRIORITY_ENV = "TALLY_BENCH_HP_STREAM_PRIORITY"
CUDNN_BENCHMARK_ENV = "TALLY_BENCH_CUDNN_BENCHMARK"
# Inductor options of the compile-triton variant: GEMMs and convolutions from Triton templates only
TRITON_KERNELS_ONLY = {"max_autotune": True, "max_autotune_gemm_backends": "TRITON",
                       "max_autotune_conv_backends": "TRITON"}


def _device() -> torch.device:
    wanted = os.environ.get("TALLY_BENCH_TORCH_DEVICE", "cuda")
    if wanted == "cuda" and not torch.cuda.is_available():
        raise TallyError("torch sees no CUDA device (torch.cuda.is_available() is False)")
    return torch.device(wanted)


def _init_weights(module: nn.Module, std: float = 0.02) -> None:
    """GPT-style init: keeps deep random transformers finite in bf16."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)


# ============================================================ building blocks


class SelfAttention(nn.Module):
    """Multi-head attention over SDPA; optional GQA (fewer KV heads), causal or masked."""

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, bias: bool = True):
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads or heads
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim, bias=bias)
        self.kv = nn.Linear(dim, 2 * self.kv_heads * self.head_dim, bias=bias)
        self.out = nn.Linear(dim, dim, bias=bias)

    def split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, heads, self.head_dim).transpose(1, 2)

    def forward(self, x, mask=None, causal=False, context=None):
        q = self.split(self.q(x), self.heads)
        k, v = self.kv(x if context is None else context).chunk(2, dim=-1)
        k, v = self.split(k, self.kv_heads), self.split(v, self.kv_heads)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                           enable_gqa=self.kv_heads != self.heads)
        b, _, t, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(b, t, -1))


class TransformerBlock(nn.Module):
    """Pre-LN (GPT-2/Neo/Whisper) or post-LN (BERT) block, GELU MLP, optional cross-attention."""

    def __init__(self, dim: int, heads: int, ffn: int, pre_norm: bool = True, cross: bool = False):
        super().__init__()
        self.pre_norm = pre_norm
        self.attn, self.ln1 = SelfAttention(dim, heads), nn.LayerNorm(dim)
        self.cross = SelfAttention(dim, heads) if cross else None
        self.ln_cross = nn.LayerNorm(dim) if cross else None
        self.mlp = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(approximate="tanh"), nn.Linear(ffn, dim))
        self.ln2 = nn.LayerNorm(dim)

    def forward(self, x, mask=None, causal=False, context=None):
        if self.pre_norm:
            x = x + self.attn(self.ln1(x), mask=mask, causal=causal)
            if self.cross is not None:
                x = x + self.cross(self.ln_cross(x), context=context)
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self.attn(x, mask=mask, causal=causal))
        return self.ln2(x + self.mlp(x))


class BertEncoder(nn.Module):
    def __init__(self, layers: int, dim: int, heads: int, vocab: int = 30522, max_len: int = 512):
        super().__init__()
        self.tok, self.pos, self.typ = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim), nn.Embedding(2, dim)
        self.ln = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, 4 * dim, pre_norm=False) for _ in range(layers))

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.ln(self.tok(ids) + self.pos(positions) + self.typ(torch.zeros_like(ids)))
        for block in self.blocks:
            x = block(x)
        return x


class BertClassifier(nn.Module):
    def __init__(self, layers, dim, heads, vocab=30522, classes=2):
        super().__init__()
        self.encoder = BertEncoder(layers, dim, heads, vocab)
        self.pool, self.head = nn.Linear(dim, dim), nn.Linear(dim, classes)

    def forward(self, ids):
        return self.head(torch.tanh(self.pool(self.encoder(ids)[:, 0])))


class BertMlm(nn.Module):
    def __init__(self, layers, dim, heads, vocab=30522):
        super().__init__()
        self.encoder = BertEncoder(layers, dim, heads, vocab)
        self.transform, self.ln = nn.Linear(dim, dim), nn.LayerNorm(dim)
        self.decoder = nn.Linear(dim, vocab)

    def forward(self, ids):
        return self.decoder(self.ln(F.gelu(self.transform(self.encoder(ids)))))


class GptDecoder(nn.Module):
    """GPT-2 (all global causal layers) or GPT-Neo (even layers global, odd layers local `window`)."""

    def __init__(self, layers, dim, heads, vocab=50257, max_len=2048, window: int | None = None):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, 4 * dim) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.tok.weight  # tied, as in GPT-2 / GPT-Neo
        self.window = window

    def forward(self, ids):
        t = ids.shape[1]
        x = self.tok(ids) + self.pos(torch.arange(t, device=ids.device))
        local_mask = None
        if self.window is not None:
            i = torch.arange(t, device=ids.device)
            local_mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < self.window)
        for index, block in enumerate(self.blocks):
            if local_mask is not None and index % 2 == 1:
                x = block(x, mask=local_mask)
            else:
                x = block(x, causal=True)
        return self.lm_head(self.ln(x))


# ---------------------------------------------------------------- Llama-style decoder


class RmsNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


def _rope(x, cos, sin):
    """Rotary embedding, half-split layout. x [b, h, t, d]; cos/sin [t, d/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[None, None], sin[None, None]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class LlamaLayer(nn.Module):
    def __init__(self, dim, heads, kv_heads, ffn):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.w_gate = nn.Linear(dim, ffn, bias=False)
        self.w_up = nn.Linear(dim, ffn, bias=False)
        self.w_down = nn.Linear(ffn, dim, bias=False)
        self.attn_norm, self.mlp_norm = RmsNorm(dim), RmsNorm(dim)

    def forward(self, x, cos, sin, k_cache, v_cache, positions, mask):
        """x [b, t, dim]; writes k/v of `positions` (long [t]) into the caches; attends with `mask`."""
        b, t, _ = x.shape
        h = self.attn_norm(x)
        q = self.wq(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.wk(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        # index_copy_ with a device tensor of positions: no host value, so it can be captured in a graph
        k_cache.index_copy_(2, positions, k)
        v_cache.index_copy_(2, positions, v)
        y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, enable_gqa=True)
        x = x + self.wo(y.transpose(1, 2).reshape(b, t, -1))
        h = self.mlp_norm(x)
        return x + self.w_down(F.silu(self.w_gate(h)) * self.w_up(h))


class LlamaDecoder(nn.Module):
    def __init__(self, layers, dim, heads, kv_heads, ffn, vocab, max_len, rope_theta=500000.0):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(LlamaLayer(dim, heads, kv_heads, ffn) for _ in range(layers))
        self.norm = RmsNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight  # tied, as in Llama 3.2 1B
        head_dim = dim // heads
        inv_freq = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        # plain attributes, not buffers: a later .to(bfloat16) must not round the angles
        # (bf16 has 8 mantissa bits: position 150 would be off by ~0.5 rad)
        self.cos, self.sin = angles.cos(), angles.sin()
        self.max_len = max_len

    def forward(self, ids, positions, caches, mask):
        x = self.embed(ids)
        cos = self.cos.index_select(0, positions).to(x.dtype)
        sin = self.sin.index_select(0, positions).to(x.dtype)
        for layer, (k_cache, v_cache) in zip(self.layers, caches):
            x = layer(x, cos, sin, k_cache, v_cache, positions, mask)
        return self.lm_head(self.norm(x[:, -1:]))


# ---------------------------------------------------------------- Whisper-like


class WhisperLike(nn.Module):
    def __init__(self, layers, dim, heads, vocab=51865, mels=80, audio_ctx=1500, text_ctx=448):
        super().__init__()
        self.conv1 = nn.Conv1d(mels, dim, 3, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, 3, stride=2, padding=1)
        # Whisper uses fixed sinusoids for the encoder; a buffer keeps that cost profile
        position = torch.arange(audio_ctx, dtype=torch.float32)[:, None]
        freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        self.register_buffer("audio_pos", torch.cat([torch.sin(position * freq), torch.cos(position * freq)], 1),
                             persistent=False)
        self.encoder = nn.ModuleList(TransformerBlock(dim, heads, 4 * dim) for _ in range(layers))
        self.enc_ln = nn.LayerNorm(dim)
        self.tok, self.text_pos = nn.Embedding(vocab, dim), nn.Embedding(text_ctx, dim)
        self.decoder = nn.ModuleList(TransformerBlock(dim, heads, 4 * dim, cross=True) for _ in range(layers))
        self.dec_ln = nn.LayerNorm(dim)

    def forward(self, mel, tokens):
        x = F.gelu(self.conv2(F.gelu(self.conv1(mel)))).transpose(1, 2)
        x = x + self.audio_pos[: x.shape[1]].to(x.dtype)
        for block in self.encoder:
            x = block(x)
        audio = self.enc_ln(x)
        y = self.tok(tokens) + self.text_pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.decoder:
            y = block(y, causal=True, context=audio)
        return self.dec_ln(y) @ self.tok.weight.t()


# ---------------------------------------------------------------- PointNet


def _mlp1d(*channels):
    layers = []
    for cin, cout in zip(channels, channels[1:]):
        layers += [nn.Conv1d(cin, cout, 1), nn.BatchNorm1d(cout), nn.ReLU()]
    return nn.Sequential(*layers)


class TNet(nn.Module):
    def __init__(self, k: int = 3):
        super().__init__()
        self.k = k
        self.features = _mlp1d(k, 64, 128, 1024)
        self.fc = nn.Sequential(nn.Linear(1024, 512), nn.BatchNorm1d(512), nn.ReLU(),
                                nn.Linear(512, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, k * k))

    def forward(self, x):
        m = self.fc(self.features(x).amax(dim=2)).view(-1, self.k, self.k)
        return m + torch.eye(self.k, device=x.device, dtype=m.dtype)


class PointNet(nn.Module):
    def __init__(self, classes: int = 40):
        super().__init__()
        self.tnet = TNet(3)
        self.features = _mlp1d(3, 64, 64, 128, 1024)
        self.head = nn.Sequential(nn.Linear(1024, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Dropout(0.3),
                                  nn.Linear(512, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, classes))

    def forward(self, points):  # [b, 3, n]
        transform = self.tnet(points)
        x = torch.bmm(transform, points)
        return self.head(self.features(x).amax(dim=2))


# ---------------------------------------------------------------- YOLO-like detector


class ConvBnAct(nn.Sequential):
    def __init__(self, cin, cout, k=1, s=1):
        super().__init__(nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout), nn.SiLU())


class Bottleneck(nn.Module):
    def __init__(self, c, shortcut=True):
        super().__init__()
        self.cv1, self.cv2, self.add = ConvBnAct(c, c, 3), ConvBnAct(c, c, 3), shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """CSP block with n bottlenecks whose outputs are all concatenated (YOLOv8 style)."""

    def __init__(self, cin, cout, n=1, shortcut=True):
        super().__init__()
        self.c = cout // 2
        self.cv1 = ConvBnAct(cin, 2 * self.c)
        self.cv2 = ConvBnAct((2 + n) * self.c, cout)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x):
        ys = list(self.cv1(x).chunk(2, 1))
        for block in self.m:
            ys.append(block(ys[-1]))
        return self.cv2(torch.cat(ys, 1))


class Sppf(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        hidden = cin // 2
        self.cv1, self.cv2 = ConvBnAct(cin, hidden), ConvBnAct(4 * hidden, cout)
        self.pool = nn.MaxPool2d(5, 1, 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.pool(x)
        y2 = self.pool(y1)
        return self.cv2(torch.cat([x, y1, y2, self.pool(y2)], 1))


class YoloLike(nn.Module):
    """Backbone (stride 32) + PAN neck + decoupled 3-scale head: 4 box + 80 class channels per cell."""

    def __init__(self, width: float = 0.5, depth: float = 0.33, classes: int = 80):
        super().__init__()
        c = [int(x * width) for x in (64, 128, 256, 512, 1024)]
        n = [max(1, round(x * depth)) for x in (3, 6, 6, 3)]
        self.stem = ConvBnAct(3, c[0], 3, 2)
        self.s2 = nn.Sequential(ConvBnAct(c[0], c[1], 3, 2), C2f(c[1], c[1], n[0]))
        self.s3 = nn.Sequential(ConvBnAct(c[1], c[2], 3, 2), C2f(c[2], c[2], n[1]))
        self.s4 = nn.Sequential(ConvBnAct(c[2], c[3], 3, 2), C2f(c[3], c[3], n[2]))
        self.s5 = nn.Sequential(ConvBnAct(c[3], c[4], 3, 2), C2f(c[4], c[4], n[3]), Sppf(c[4], c[4]))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.td4 = C2f(c[4] + c[3], c[3], n[0], shortcut=False)
        self.td3 = C2f(c[3] + c[2], c[2], n[0], shortcut=False)
        self.down3 = ConvBnAct(c[2], c[2], 3, 2)
        self.bu4 = C2f(c[2] + c[3], c[3], n[0], shortcut=False)
        self.down4 = ConvBnAct(c[3], c[3], 3, 2)
        self.bu5 = C2f(c[3] + c[4], c[4], n[0], shortcut=False)
        self.heads = nn.ModuleList(
            nn.ModuleDict({
                "box": nn.Sequential(ConvBnAct(ch, 64, 3), ConvBnAct(64, 64, 3), nn.Conv2d(64, 4 * 16, 1)),
                "cls": nn.Sequential(ConvBnAct(ch, max(ch, classes), 3), ConvBnAct(max(ch, classes), max(ch, classes), 3),
                                     nn.Conv2d(max(ch, classes), classes, 1)),
            }) for ch in (c[2], c[3], c[4]))

    def forward(self, x):
        p3 = self.s3(self.s2(self.stem(x)))
        p4 = self.s4(p3)
        p5 = self.s5(p4)
        t4 = self.td4(torch.cat([self.up(p5), p4], 1))
        t3 = self.td3(torch.cat([self.up(t4), p3], 1))
        b4 = self.bu4(torch.cat([self.down3(t3), t4], 1))
        b5 = self.bu5(torch.cat([self.down4(b4), p5], 1))
        outs = []
        for feature, head in zip((t3, b4, b5), self.heads):
            out = torch.cat([head["box"](feature), head["cls"](feature)], 1)
            outs.append(out.flatten(2))
        return torch.cat(outs, 2)  # [b, 64 + classes, cells]


# ============================================================ workload wrappers


def _versions(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device)}
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
        info["cudnn"] = torch.backends.cudnn.version()
    return info


class InferenceWorkload:
    """One request = model(*inputs) under inference_mode on the HP stream, then stream sync.

    variant graph: inputs are static buffers; the forward is captured once and
    replayed per request (no CPU launch cost: the GPU-bound form of the model).
    """

    def __init__(self, model: nn.Module, inputs: tuple, variant: str, name: str, request=None):
        self.device = _device()
        self.name, self.variant = name, variant
        self.model = model.eval()
        self.inputs = inputs
        # `request` overrides the default forward (llama-decode runs prefill + decode loop)
        self._request = request or (lambda: self.model(*self.inputs))
        self.stream = None
        self.stream_priority = None
        if self.device.type == "cuda":
            priority = 0
            if os.environ.get(HP_STREAM_PRIORITY_ENV) == "high":
                # lower number = higher priority; min() whatever order the pair comes in
                priority = min(torch.cuda.Stream.priority_range())
            self.stream = torch.cuda.Stream(priority=priority)
            self.stream_priority = self.stream.priority
            torch.cuda.synchronize()  # weights and inputs were made on the default stream
        if variant == "compile":
            self.model = torch.compile(self.model)
            if request is None:
                self._request = lambda: self.model(*self.inputs)
        self.graph = None
        self.output = None
        if variant == "graph":
            self._capture()

    def _capture(self) -> None:
        if self.device.type != "cuda":
            raise TallyError("variant graph needs CUDA")
        with torch.inference_mode():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # warm up lazy inits (cuBLAS handles, cuDNN algos) outside the capture
                    self._request()
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.output = self._request()
        torch.cuda.synchronize()

    def step(self) -> None:
        if self.stream is None:
            with torch.inference_mode():
                self.output = self._request()
            return
        with torch.cuda.stream(self.stream):
            if self.graph is not None:
                self.graph.replay()
            else:
                with torch.inference_mode():
                    self.output = self._request()
        self.stream.synchronize()

    def check(self) -> str:
        out = self.output if torch.is_tensor(self.output) else None
        if out is None:
            return ""
        if out.is_floating_point() and not torch.isfinite(out.float()).all():
            raise TallyError(f"{self.name}: non-finite output")
        return f"output {tuple(out.shape)}"

    def info(self) -> dict:
        out = _versions(self.device)
        out.update(variant=self.variant, hp_stream_priority=self.stream_priority,
                   parameters=sum(p.numel() for p in self.model.parameters()))
        return out


class TrainingWorkload:
    """One step = zero_grad, forward under bf16 autocast, loss, backward, optimizer step, device sync."""

    def __init__(self, model: nn.Module, make_loss, optimizer, variant: str, name: str):
        self.device = _device()
        self.name, self.variant = name, variant
        self.model = model.train()
        self.parameters = sum(p.numel() for p in model.parameters())
        if variant == "compile":
            self.model = torch.compile(self.model)
        elif variant == "compile-triton":
            self.model = torch.compile(self.model, options=TRITON_KERNELS_ONLY)
        self.make_loss = make_loss
        self.optimizer = optimizer
        self.loss = None

    def step(self) -> None:
        self.enqueue_step()
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()

    def enqueue_step(self) -> None:
        """The step's work, enqueued: returns when the host has launched it, not when it ran
        (benchmarks/be_host_bound.py times the two apart)."""
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            loss = self.make_loss(self.model)
        loss.backward()
        self.optimizer.step()
        self.loss = loss.detach()

    def check(self) -> str:
        value = float(self.loss) if self.loss is not None else math.nan
        if not math.isfinite(value):
            raise TallyError(f"{self.name}: loss is {value}")
        return f"loss {value:.3f}"

    def info(self) -> dict:
        out = _versions(self.device)
        out.update(variant=self.variant, parameters=self.parameters)
        return out


def _adamw(model: nn.Module, device: torch.device):
    # fused AdamW is the fast path on CUDA; the CPU dev aid uses the default
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")


def _batch(spec, options) -> int:
    return int(options.get("batch", spec.batch_size))


def _opt(spec, options, key):
    return options.get(key, spec.details[key])


def _setup():
    device = _device()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = os.environ.get(CUDNN_BENCHMARK_ENV, "1") != "0"
    torch.manual_seed(0)
    return device


# ---------------------------------------------------------------- factories (training)


def resnet50_train(spec, variant, options):
    import torchvision

    device = _setup()
    batch = _batch(spec, options)
    with device:
        model = torchvision.models.resnet50(weights=None).to(memory_format=torch.channels_last)
        images = torch.randn(batch, 3, 224, 224).to(memory_format=torch.channels_last)
        labels = torch.randint(0, 1000, (batch,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return TrainingWorkload(model, lambda m: F.cross_entropy(m(images), labels), optimizer, variant, spec.name)


def bert_train(spec, variant, options):
    device = _setup()
    batch, seq = _batch(spec, options), int(_opt(spec, options, "seq"))
    d = spec.details
    with device:
        model = BertMlm(int(options.get("layers", d["layers"])), d["hidden"], d["heads"], d["vocab"])
        _init_weights(model)
        ids = torch.randint(0, d["vocab"], (batch, seq))
        labels = torch.randint(0, d["vocab"], (batch, seq))
    return TrainingWorkload(model, lambda m: F.cross_entropy(m(ids).flatten(0, 1), labels.flatten()),
                            _adamw(model, device), variant, spec.name)


def gpt2_train(spec, variant, options):
    device = _setup()
    batch, seq = _batch(spec, options), int(_opt(spec, options, "seq"))
    d = spec.details
    with device:
        model = GptDecoder(int(options.get("layers", d["layers"])), d["hidden"], d["heads"], d["vocab"],
                           max_len=max(1024, seq))
        _init_weights(model)
        ids = torch.randint(0, d["vocab"], (batch, seq + 1))
    return TrainingWorkload(
        model, lambda m: F.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()),
        _adamw(model, device), variant, spec.name)


def whisper_train(spec, variant, options):
    device = _setup()
    batch = _batch(spec, options)
    target = int(options.get("target_tokens", spec.details["target_tokens"]))
    frames = int(options.get("frames", 3000))
    d = spec.details
    with device:
        model = WhisperLike(int(options.get("layers", 12)), d["hidden"], d["heads"], d["vocab"])
        _init_weights(model)
        mel = torch.randn(batch, 80, frames)
        tokens = torch.randint(0, d["vocab"], (batch, target + 1))
    return TrainingWorkload(
        model, lambda m: F.cross_entropy(m(mel, tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()),
        _adamw(model, device), variant, spec.name)


def pointnet_train(spec, variant, options):
    device = _setup()
    batch, points = _batch(spec, options), int(_opt(spec, options, "points"))
    with device:
        model = PointNet(spec.details["classes"])
        cloud = torch.randn(batch, 3, points)
        labels = torch.randint(0, spec.details["classes"], (batch,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=device.type == "cuda")
    return TrainingWorkload(model, lambda m: F.cross_entropy(m(cloud), labels), optimizer, variant, spec.name)


# ---------------------------------------------------------------- factories (inference)


def _bf16(model: nn.Module) -> nn.Module:
    return model.to(torch.bfloat16)


def resnet50_infer(spec, variant, options):
    import torchvision

    device = _setup()
    batch = _batch(spec, options)
    with device:
        model = _bf16(torchvision.models.resnet50(weights=None).to(memory_format=torch.channels_last))
        images = torch.randn(batch, 3, 224, 224, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    return InferenceWorkload(model, (images,), variant, spec.name)


def bert_infer(spec, variant, options):
    device = _setup()
    batch, seq = _batch(spec, options), int(_opt(spec, options, "seq"))
    d = spec.details
    with device:
        model = BertClassifier(int(options.get("layers", d["layers"])), d["hidden"], d["heads"], d["vocab"])
        _init_weights(model)
        model = _bf16(model)
        ids = torch.randint(0, d["vocab"], (batch, seq))
    return InferenceWorkload(model, (ids,), variant, spec.name)


def yolo_infer(spec, variant, options):
    device = _setup()
    batch = _batch(spec, options)
    size = int(options.get("image", 640))
    with device:
        model = _bf16(YoloLike())
        images = torch.randn(batch, 3, size, size, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        model = model.to(memory_format=torch.channels_last)
    return InferenceWorkload(model, (images,), variant, spec.name)


def gptneo_infer(spec, variant, options):
    device = _setup()
    batch, seq = _batch(spec, options), int(_opt(spec, options, "seq"))
    d = spec.details
    layers = int(options.get("layers", d["layers"]))
    with device:
        model = GptDecoder(layers, d["hidden"], d["heads"], d["vocab"], max_len=2048, window=d["window"])
        _init_weights(model)
        model = _bf16(model)
        ids = torch.randint(0, d["vocab"], (batch, seq))
    return InferenceWorkload(model, (ids,), variant, spec.name)


class LlamaRequest:
    """Prefill `prompt` tokens for the batch, then `new_tokens` greedy decode steps.

    Everything the steps need lives in static device buffers (token ids,
    positions, masks, KV caches), so the whole request can be captured as one
    CUDA graph. Decode steps attend over the full cache with a mask of the
    filled positions; the mask and positions advance on the device.
    """

    def __init__(self, model: LlamaDecoder, batch: int, prompt: int, new_tokens: int, vocab: int):
        self.model, self.prompt, self.new_tokens = model, prompt, new_tokens
        device = model.embed.weight.device
        dtype = model.embed.weight.dtype
        layer = model.layers[0]
        max_len = model.max_len
        shape = (batch, layer.kv_heads, max_len, layer.head_dim)
        self.caches = [(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
                       for _ in model.layers]
        self.prompt_ids = torch.randint(0, vocab, (batch, prompt), device=device)
        self.prompt_positions = torch.arange(prompt, device=device)
        cols = torch.arange(max_len, device=device)
        # prefill: row i (position i) sees cache columns 0..i
        self.prefill_mask = cols[None, :] <= self.prompt_positions[:, None]
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.columns = cols
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.generated = torch.zeros(batch, new_tokens, dtype=torch.long, device=device)

    def __call__(self):
        logits = self.model(self.prompt_ids, self.prompt_positions, self.caches, self.prefill_mask)
        self.tokens.copy_(logits[:, -1].argmax(-1, keepdim=True))
        self.position.fill_(self.prompt)
        for i in range(self.new_tokens):
            self.generated[:, i : i + 1].copy_(self.tokens)
            mask = (self.columns <= self.position)[None, :]  # [1 query, max_len]
            logits = self.model(self.tokens, self.position, self.caches, mask)
            self.tokens.copy_(logits[:, -1].argmax(-1, keepdim=True))
            self.position.add_(1)
        return self.generated


def llama_decode(spec, variant, options):
    device = _setup()
    d = spec.details
    batch = _batch(spec, options)
    prompt = int(options.get("prompt", d["prompt"]))
    new_tokens = int(options.get("new_tokens", d["new_tokens"]))
    layers = int(options.get("layers", d["layers"]))
    with device:
        model = LlamaDecoder(layers, d["hidden"], d["heads"], d["kv_heads"], d["ffn"], d["vocab"],
                             max_len=prompt + new_tokens)
        _init_weights(model)
        model = _bf16(model)
    request = LlamaRequest(model, batch, prompt, new_tokens, d["vocab"])
    return InferenceWorkload(model, (), variant, spec.name, request=request)
