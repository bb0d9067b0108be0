"""Weight-only quantised linear layers for fast CPU decoding (a module swap, as LoRA will be).

Decoding a few tokens at a time is bound by reading the weights, so fewer bytes per weight is
speed: int4 (groups of 32, a scale and a zero each) or int8 (one scale per output row), with bf16
activations, through torch's CPU kernels `_weight_int4pack_mm_for_cpu` / `_weight_int8pack_mm`.
Those kernels compute each row the same way whatever the batch (batch-invariant), so the `torch`
backend uses them for every row count; a bf16 copy kept alongside ([in, out]) serves autograd and,
with `dense_rows` set (an opt-in, not batch-invariant), batches of more rows (`x @ w_t` ran up to 1.5x
faster than `F.linear` on these CPUs for prefill-sized batches). That is the `torch` backend;
`prepare(model, backend)` packs the weights for the C++ kernels of the others, once, into
q4_linear's layout (int4 x int8 dot products, souverain/kernels/q4.cpp: AMX tiles for wide steps where
the CPU has them, AVX-512 VNNI or AVX2 otherwise), which every step reads whatever its number of rows:
the same bits for a row alone or in any batch. Those kernels read x to 11 bits per 32 values (two int8
parts, x = u * (16 q1 + q2)): SmolLM2's mean KL to its fp32 model over six chat prompts (bench/accuracy.py)
is 0.0028 with them, 0.0031 on the torch backend (bf16 activations), and was 0.0047 with the 8-bit
activations they replaced (two parts for wqkv and w2 only; with one part everywhere SmolLM2 answered "What is
the capital of France?" with "L'Étoile").

On AMX and on AVX-512 BF16 (AMD Zen 4, Intel Cooper Lake and later), prompt tokens (the rows `PromptRows`
names) take another product over the same int4 codes: `q4_linear_bf16` dequantises them to bf16 once per call
and sums x (bf16, as is) times them in fp32 over all of K (the zeros times x's block sums apart), on AMX tiles
1.6-1.8x faster than q4_linear's per-block int8 products at 512 rows (at 1 row 3.5x slower: decodes stay int8),
with vdpbf16ps on AMD Zen 4 1.2-1.4x faster at 128-512 rows (about even at 12-32); SmolLM2's mean KL on prompt
rows 0.0038-0.0039 (bench/accuracy.py; 0.0028-0.0032 on generated rows). Each row is still computed the same
way alone or in any batch: a prompt token always by the one, a generated token always by the other (the engine
then keeps generated tokens' KV blocks out of the prefix cache, see souverain/engine/blocks.py).

The projections that read the same input are fused, one matmul instead of several: wq/wk/wv into
`Attention.wqkv` and w1/w3 into `FeedForward.w13` (fewer, larger calls; the outputs are split).

int4 from a GGUF Q4_1 checkpoint is near-exact: Q4_1 blocks are 32 values spanning min..max in
16 steps, which is exactly the grid min/max quantisation finds again (only the scale and zero
round to bf16).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, TypeVar

import torch
from torch import nn

from souverain.kernels import tiles as amx_tiles
from souverain.kernels.backend import TORCH, Backend
from souverain.model.layers import Attention, FeedForward, PromptRows, swiglu
from souverain.model.moe import MoeFeedForward
from souverain.model.transformer import Transformer

GROUP = 32
_M = TypeVar("_M", bound=nn.Module)


def _int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (packed int4 weight, scales_and_zeros [K/32, N, 2]); dequant = (q - 8) * s + z."""
    q, scales_zeros = _int4_codes(w)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), scales_zeros


def _int4_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (codes q [N, K] int32 in 0..15, scales_and_zeros [K/32, N, 2] bf16)."""
    n, k = w.shape
    groups = w.reshape(n, k // GROUP, GROUP)
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    q = torch.round((groups - lo) / scale).clamp(0, 15).to(torch.int32).reshape(n, k)
    zero = lo + 8 * scale
    scales_zeros = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [K/32, N, 2]
    return q, scales_zeros


class QuantLinear(nn.Module):
    splits_prompt_rows = True  # ForwardContext.linear passes `prompt`
    dense_t: torch.Tensor | None
    # Set by `prepare` for the C++ backends: the weight in q4_linear's (int4) or q8_linear's (int8) layout.
    codes: torch.Tensor | None
    code_scales: torch.Tensor | None

    @classmethod
    def fused(cls, modules: list[nn.Module | None], bits: int, dense_rows: int | None = None) -> QuantLinear:
        """One QuantLinear computing the linears' outputs side by side (same input)."""
        linears = [m for m in modules if isinstance(m, nn.Linear)]
        if len(linears) != len(modules):
            raise TypeError("only nn.Linear projections can be fused")
        first = linears[0]
        joined = nn.Linear(first.in_features, sum(lin.out_features for lin in linears), bias=first.bias is not None,
                           device="meta")
        joined.weight = nn.Parameter(torch.cat([lin.weight.detach() for lin in linears]), requires_grad=False)
        if first.bias is not None:
            joined.bias = nn.Parameter(torch.cat([lin.bias.detach() for lin in linears if lin.bias is not None]),
                                       requires_grad=False)
        return cls(joined, bits, dense_rows)

    def __init__(self, linear: nn.Linear, bits: int, dense_rows: int | None = None) -> None:
        super().__init__()
        # The output projection's logits leave the C++ products in fp32: rounded to bf16 (a step of 0.125 at
        # 24), the top two of SmolLM2's first answer token tied and greedy took the wrong one.
        self.logits = False
        w = linear.weight.detach().float()
        # The int4 kernel wants K in whole groups and N in multiples of 16 (a MoE router has 8).
        self.bits = 4 if bits == 4 and w.shape[1] % GROUP == 0 and w.shape[0] % 16 == 0 else 8
        if self.bits == 4:
            packed, sz = _int4(w)
            self.qweight, self.scales = nn.Buffer(packed), nn.Buffer(sz)
        else:
            scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # [N]
            self.qweight = nn.Buffer(torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
            self.scales = nn.Buffer(scales.to(torch.bfloat16))
        self.dense_t = nn.Buffer(linear.weight.detach().to(torch.bfloat16).t().contiguous())  # [in, out]
        for name in ("codes", "code_scales"):
            self.register_buffer(name, None)
        self.bias = linear.bias
        self.dense_rows = dense_rows
        self.out_features = linear.out_features
        self.backend = TORCH  # what `prepare` packed the weights for
        self.ops: ModuleType | None = None
        self.prompt_bf16 = False  # prompt rows through q4_linear_bf16 (set by `prepare`)

    def prepare(self, backend: Backend) -> None:
        """Pack the weights for `backend`, once, dropping the forms it does not read:
        amx, avx512, avx2   q4_linear's / q8_linear's layout for every row count: one arithmetic
                (int4 or int8 weights x int8 activations, exact integer sums) alone or in any batch
        torch, cuda    unchanged: torch's int4/int8 kernels for every row count (each row's result is the same
                alone or in a batch); with `dense_rows` set, the bf16 copy beyond that many rows (faster
                prefill, not batch-invariant: an explicit opt-in)"""
        if backend == self.backend:
            return
        if self.backend != TORCH:
            raise RuntimeError(f"this model's weights are packed for {self.backend} already; load it again for "
                               f"{backend}")
        dense = self.dense_t
        if dense is None or dense.device.type != "cpu" or backend.ops is None:
            return
        n, k = dense.shape[1], dense.shape[0]
        if not (backend.q4_isa > 0 and n % 16 == 0 and k % GROUP == 0):
            return
        # The codes again, from the bf16 copy: the same as qweight's for a bf16 model.
        codes = _int4_codes(dense.t().float()) if self.bits == 4 else None
        # New forms are set before the old ones go: a forward running meanwhile sees one or the other.
        self.codes, self.code_scales = amx_tiles.pack_q4(*codes) if codes is not None else \
            amx_tiles.pack_q8(self.qweight, self.scales)
        self.ops, self.backend = backend.ops, backend
        isa = backend.prefill_isa
        self.prompt_bf16 = codes is not None and n % 32 == 0 and isa > 0 and backend.ops.bf16_supported(isa)
        self.qweight = self.scales = nn.Buffer(torch.empty(0))  # every step reads the codes now
        self.dense_t = None

    def forward(self, x: torch.Tensor, prompt: PromptRows | None = None, glu: bool = False) -> torch.Tensor:
        """x [..., in] -> [..., out]. `prompt`: which of x's rows (flattened) are prompt tokens; on AMX those
        take the bf16 product (see the module's docstring), the others q4_linear's. `glu`: this is a fused
        [gate | up] projection, return swiglu of its output ([..., out / 2]; the same bits)."""
        codes, code_scales = self.codes, self.code_scales
        if prompt is not None and self.prompt_bf16 and self.ops is not None and codes is not None and \
                code_scales is not None and not (torch.is_grad_enabled() and x.requires_grad):
            shape = x.shape
            fuse = glu and self.bias is None and self.out_features % 64 == 0  # whole 32-column halves
            y = self._split(x.reshape(-1, shape[-1]).to(torch.bfloat16), prompt, codes, code_scales, fuse)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
            if glu and not fuse:
                y = swiglu(y, self.ops)
            return y.to(x.dtype).reshape(*shape[:-1], y.shape[-1])
        return swiglu(self._plain(x), self.ops) if glu else self._plain(x)

    def _plain(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        codes, code_scales = self.codes, self.code_scales
        if codes is not None and code_scales is not None:
            y = self._q4(x2, codes, code_scales)
        elif (self.dense_rows is not None and x2.shape[0] > self.dense_rows) or x2.device.type != "cpu" or \
                (torch.is_grad_enabled() and x2.requires_grad):  # (torch's int kernels: CPU, no gradients)
            dense = self.dense_t
            if dense is None:
                raise RuntimeError("QuantLinear has neither its codes nor its dense copy")
            y = x2 @ dense
        elif self.bits == 4:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, GROUP, self.scales)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        if not (self.logits and y.dtype == torch.float32):
            y = y.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def _split(self, x2: torch.Tensor, prompt: PromptRows, codes: torch.Tensor, scales: torch.Tensor,
               glu: bool) -> torch.Tensor:
        ops, isa = self.ops, self.backend.prefill_isa
        assert ops is not None
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        def generated(rows: torch.Tensor) -> torch.Tensor:
            out = self._q4(rows, codes, scales)
            return ops.swiglu(out) if glu else out

        if prompt.count is not None:  # no gathers or scatters (ATen's index ops wake OpenMP's threads)
            p = prompt.count
            return torch.cat([ops.q4_linear_bf16(x2[:p], codes, scales, glu, isa), generated(x2[p:])])
        if prompt.rows is None or prompt.others is None:
            return ops.q4_linear_bf16(x2, codes, scales, glu, isa)
        y = x2.new_empty(x2.shape[0], self.out_features // 2 if glu else self.out_features)
        y[prompt.rows] = ops.q4_linear_bf16(x2[prompt.rows], codes, scales, glu, isa)
        y[prompt.others] = generated(x2[prompt.others])
        return y

    def _q4(self, x2: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        if self.ops is None or (torch.is_grad_enabled() and x2.requires_grad):
            # Under autograd: the same weights through PyTorch (the activations not quantised).
            w = amx_tiles.dequantise_int4(*amx_tiles.unpack_q4(codes, scales)) if self.bits == 4 else \
                amx_tiles.unpack_q8(codes).float() * scales[:, None]
            return x2 @ w.to(torch.bfloat16).t()
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        if self.bits == 4:
            return self.ops.q4_linear(x2, codes, scales, self.backend.q4_isa, self.logits)
        return self.ops.q8_linear(x2, codes, scales, self.backend.q4_isa, self.logits)


def prepare(model: _M, backend: Backend) -> _M:
    """Pack every QuantLinear of `model` for `backend` (see QuantLinear.prepare), in place, and give each
    mixture of experts with quantised experts its C++ form (decoder.cpp's Moe, which the C++ decoder runs
    too); the wiring code calls it once, before building engines on the model."""
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.prepare(backend)
    fast = backend.ops
    for module in model.modules():
        if isinstance(module, MoeFeedForward) and fast is not None and module.w13s is not None and \
                module.w2s is not None:
            router = kernel_linear(fast, module.gate)
            experts = [[kernel_linear(fast, m) for m in module.w13s], [kernel_linear(fast, m) for m in module.w2s]]
            if router is not None and all(part is not None for part in [*experts[0], *experts[1]]):
                module.fused = fast.Moe(router=router, gate_up=experts[0], down=experts[1], top_k=module.top_k)
    return model


def kernel_linear(fast: ModuleType, m: nn.Module | None) -> Any | None:
    """A projection's forms for the C++ kernels (decoder.cpp's Linear): an exact nn.Linear or a QuantLinear,
    in bf16; None for anything else."""
    if type(m) is nn.Linear:
        if m.weight.dtype != torch.bfloat16:
            return None
        return fast.Linear(weight=m.weight.detach(), bias=None if m.bias is None else m.bias.detach())
    if isinstance(m, QuantLinear):
        bias = None if m.bias is None else m.bias.detach()
        if m.ops is not None and m.ops is not fast:
            return None  # packed for another backend's kernels
        return fast.Linear(qweight=m.qweight, scales=m.scales, dense_t=m.dense_t, codes=m.codes,
                           code_scales=m.code_scales, bias=bias, bits=m.bits,
                           dense_rows=-1 if m.dense_rows is None else m.dense_rows, group=GROUP,
                           isa=m.backend.q4_isa)
    return None


def resolve_bits(bits: str | int, quantization: str | None) -> int:
    """`auto` means int4 weights for 4-bit GGUF checkpoints (near-exact, see above), else none."""
    if bits == "auto":
        return 4 if (quantization or "").startswith(("Q4_0", "Q4_1")) else 0
    value = int(bits)
    if value not in (0, 4, 8):
        raise ValueError(f"bits must be auto, 0, 4 or 8, got {bits!r}")
    return value


def _linear(weight: torch.Tensor) -> nn.Linear:
    """An nn.Linear (no bias) holding `weight` [out, in], e.g. one expert of a stack."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(weight.detach(), requires_grad=False)
    return lin


def quantize(model: nn.Module, *, bits: int = 4, dense_rows: int | None = None, fuse: bool = True) -> nn.Module:
    """Swap every nn.Linear for a QuantLinear, in place (and each MoE expert's projections), fusing
    wq/wk/wv and w1/w3 unless `fuse` is False. The output projection is int8 whatever `bits` (logits
    are sensitive); a tied one gets its own int8 copy of the embedding matrix."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if isinstance(model, Transformer):
        head = model.output
        if head is None:
            head = nn.Linear(model.args.dim, model.args.vocab_size, bias=False, device="meta")
            head.weight = model.tok_embeddings.weight
        if isinstance(head, nn.Linear):
            model.output = QuantLinear(head, 8, dense_rows)
            model.output.logits = True
    if fuse and isinstance(model, Attention) and model.wq is not None:
        model.fuse_qkv(QuantLinear.fused([model.wq, model.wk, model.wv], bits, dense_rows))
    if isinstance(model, MoeFeedForward) and model.w13s is None:
        # Each expert's projections (the router stays a plain linear below, int8).
        experts = range(model.gate.out_features)
        model.quantized([QuantLinear.fused([_linear(model.w1[e]), _linear(model.w3[e])], bits, dense_rows)
                         for e in experts],
                        [QuantLinear(_linear(model.w2[e]), bits, dense_rows) for e in experts])
    if fuse and isinstance(model, FeedForward) and model.w1 is not None:
        model.fuse_w13(QuantLinear.fused([model.w1, model.w3], bits, dense_rows))
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, QuantLinear(child, bits, dense_rows))
        else:
            quantize(child, bits=bits, dense_rows=dense_rows, fuse=fuse)
    return model
