"""Linear + cross-entropy without the (batch, sequence, vocab) logits (the model-level forward: `fused_lm`).

For a 128,256-token vocabulary one 4,096-token sequence has 525 M logits: 1 GiB in bf16, 2 GiB once upcast to fp32
for the loss, and as much again for their gradient. Here the output head and the loss run chunk by chunk over the
tokens; no tensor larger than (chunk, vocab) ever exists, and autograd keeps nothing larger than the hidden states.

    hidden (B, T, H) ──► rows whose (shifted) label is not ignore_index ──► chunks of `chunk_size` rows
        per chunk: z = x·Wᵀ (+ u·W2ᵀ) (+ b)   in the compute dtype (bf16 under QLoRA), like the stock head
                   z ← cap·tanh(z / cap)      fp32, only with a soft-cap (Gemma 2 `final_logit_softcapping`)
                   loss += logsumexp(z) − z[label]                    fp32, as transformers' `ForCausalLMLoss`
                   dz = (softmax(z) − onehot(label)) / denominator    cast to the compute dtype, then
                   ∂x = dz·W (rows scattered back), ∂W += dzᵀ·x (fp32 accumulator), ∂b += Σ dz, ∂u, ∂W2 likewise
    loss = Σ / num_items_in_batch  (when given: gradient accumulation), else Σ / (number of non-ignored labels)

Pure torch (a `torch.autograd.Function`), CPU and GPU alike; nothing here imports the rest of hf_lowrank.

API
---
``linear_cross_entropy(hidden, weight, labels, *, bias=None, ignore_index=-100, num_items_in_batch=None, shift=True,
softcap=None, chunk_size=None, low_rank=None, recompute=False) -> loss``
    The loss transformers' ``ForCausalLMLoss`` computes from ``F.linear(hidden, weight, bias)``, without the logits.
    ``hidden`` (B, T, H) or (N, H), any float dtype; ``weight`` (V, H), frozen or trainable (``modules_to_save`` or a
    head tied to the input embeddings: its gradient is returned like any other); ``labels`` (B, T) or (N,).
    ``shift=True`` predicts labels[t + 1] from hidden[t] (labels padded with ignore_index, as transformers does);
    pass already-shifted ``shift_labels`` with ``shift=False``. ``low_rank=(u, w2)`` adds ``u·w2ᵀ`` to the logits
    (a LoRA adapter on the head: u = s·dropout(h)·Aᵀ, w2 = B). ``chunk_size=None`` picks the rows per chunk so that
    one chunk's fp32 logits stay near 64 MiB on CPU, 256 MiB on CUDA (`auto_chunk_size`).
    ``recompute=False`` (default): each chunk's gradient is computed in the forward, right after its loss, and kept
    at the size of the hidden states until the backward, which only scales it by the incoming gradient: the logits
    are computed once, as in the stock path. ``recompute=True``: the backward recomputes each chunk's logits from the
    saved hidden states (one more head matmul; the same memory), and is what fp16 always gets (a gradient taken
    before the loss scale is known underflows there). Either way the gradient is exact for any upstream scalar
    (gradient-accumulation scaling, AMP loss scaling). Without grad mode nothing but the loss is computed.

Tolerances (tests/test_loss.py): against the stock ``model(input_ids, labels=…)``, fp32 loss and every gradient
within 1e-5 relative (max |Δ| / max |ref|); bf16 within 1e-3 on the loss and 2e-2 on each gradient (bf16 rounds at
2⁻⁸; the chunked matmuls and the fp32 accumulation of ∂W round differently from the one big matmul).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger("hf_lowrank")

__all__ = ["auto_chunk_size", "linear_cross_entropy", "linear_log_probs"]

#: bytes of fp32 logits one chunk may hold, by device type (the chunk's other temporaries are about 1.5× that).
CHUNK_BYTES = {"cpu": 64 * 2**20, "cuda": 256 * 2**20}


def auto_chunk_size(vocab_size: int, device: torch.device | str = "cpu") -> int:
    """Rows per chunk: the largest power of two (16 … 8192) whose fp32 (rows, vocab) logits fit `CHUNK_BYTES`."""
    budget = CHUNK_BYTES.get(torch.device(device).type, CHUNK_BYTES["cuda"])
    rows = max(1, budget // (4 * max(vocab_size, 1)))
    return int(min(8192, max(16, 1 << (rows.bit_length() - 1))))


# ---- the chunked linear + cross-entropy ----------------------------------------------------------------------------


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         bias: torch.Tensor | None = None, ignore_index: int = -100,
                         num_items_in_batch: torch.Tensor | int | None = None, shift: bool = True,
                         softcap: float | None = None, chunk_size: int | None = None,
                         low_rank: tuple[torch.Tensor, torch.Tensor] | None = None,
                         recompute: bool = False) -> torch.Tensor:
    """Cross-entropy of ``F.linear(hidden, weight, bias)`` against ``labels`` without materialising the logits.

    Same value and gradients as transformers' ``ForCausalLMLoss`` on the full logits (see the module docstring).
    Returns a 0-dim fp32 tensor. Labels outside [0, vocab) other than ``ignore_index`` raise ``ValueError``.
    """
    if hidden.dim() < 2 or hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} do not match: hidden must "
                         "be (..., H) with the labels' shape in front")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} is not (vocab, {hidden.shape[-1]})")
    device = weight.device
    vocab, width = weight.shape
    if shift:
        labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]  # as ForCausalLMLoss: tokens < n predict n
    h = hidden.to(device).reshape(-1, width)  # a view when contiguous
    y = labels.to(device).reshape(-1)
    rows = (y != ignore_index).nonzero().squeeze(1)
    targets = y.index_select(0, rows)
    if targets.numel() and bool((targets < 0).any() | (targets >= vocab).any()):
        bad = targets[(targets < 0) | (targets >= vocab)][:5].tolist()
        raise ValueError(f"labels {bad} are outside [0, {vocab}) and are not ignore_index={ignore_index}")
    u = w2 = None
    if low_rank is not None:
        u, w2 = low_rank
        u = u.to(device).reshape(-1, u.shape[-1])
        if u.shape[0] != h.shape[0] or w2.shape != (vocab, u.shape[1]):
            raise ValueError(f"low_rank: u {tuple(u.shape)} and w2 {tuple(w2.shape)} do not fit hidden "
                             f"{tuple(h.shape)} and vocab {vocab}")
    if num_items_in_batch is None:
        denom = torch.tensor(float(rows.numel()), device=device)  # mean over the non-ignored labels (0/0 = nan)
    else:
        denom = torch.as_tensor(num_items_in_batch, device=device).to(torch.float32).reshape(())
    chunk = int(chunk_size) if chunk_size else auto_chunk_size(vocab, device)
    grad_on = torch.is_grad_enabled()
    needs = tuple(bool(grad_on and t is not None and t.requires_grad) for t in (h, weight, bias, u, w2))
    dtype = _compute_dtype(device, h.dtype)
    # fp16 cannot hold a gradient taken before the upstream factor (AMP's loss scale) is known: it would underflow,
    # and the scale itself can overflow in fp16; so its gradient is always recomputed in the backward
    opts = _Opts(chunk=chunk, softcap=float(softcap) if softcap else None, needs=needs,
                 recompute=recompute or dtype == torch.float16, dtype=dtype)
    return _LinearCrossEntropy.apply(h, weight, bias, u, w2, rows, targets, denom, opts)


@dataclass(frozen=True)
class _Opts:
    chunk: int
    softcap: float | None
    needs: tuple[bool, ...]  # requires grad: hidden, weight, bias, u, w2
    recompute: bool
    dtype: torch.dtype  # the head's matmul dtype: autocast's when it is on (as the stock head would run), else hidden's


def _compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    try:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
    except (TypeError, RuntimeError):  # device types without autocast
        pass
    return dtype


class _Chunks:
    """Per-chunk logits, loss and logits gradient, shared by the forward and the recomputing backward. Everything
    runs outside autocast, with the operands already in the compute dtype (what autocast would have given the head).

    Two (chunk, vocab) buffers are allocated once per call and reused by every chunk: the logits / their gradient
    in the compute dtype, and the fp32 logits / softmax (plus tanh's for a soft-cap). On CPU a fresh tensor of that
    size is a fresh mmap, and its page faults cost more than the arithmetic.
    """

    def __init__(self, h, weight, bias, u, w2, opts: _Opts, rows: int):
        dt = opts.dtype
        self.h, self.u, self.softcap, self.dtype = h, u, opts.softcap, dt
        self.weight = weight.to(dt)  # no copy unless autocast lowers an fp32 head (as autocast does)
        self.bias = None if bias is None else bias.to(dt)
        self.w2 = None if w2 is None else w2.to(dt)
        c, vocab, dev = min(opts.chunk, max(rows, 1)), weight.shape[0], weight.device
        self.zbuf = torch.empty(c, vocab, dtype=dt, device=dev)
        self.fbuf = self.zbuf if dt == torch.float32 else torch.empty(c, vocab, dtype=torch.float32, device=dev)
        self.tbuf = torch.empty(c, vocab, dtype=torch.float32, device=dev) if opts.softcap else None

    def logits(self, r: torch.Tensor):
        """(x, u_c, z): the chunk's inputs and its logits in the compute dtype (the head's own F.linear)."""
        x = self.h.index_select(0, r).to(self.dtype)  # (c, H)
        z = self.zbuf[:r.numel()]
        if self.bias is None:
            torch.mm(x, self.weight.t(), out=z)  # (c, H) @ (H, V)
        else:
            torch.addmm(self.bias, x, self.weight.t(), out=z)
        uc = None
        if self.u is not None:
            uc = self.u.index_select(0, r).to(self.dtype)  # (c, r)
            z.addmm_(uc, self.w2.t())  # + u·W2ᵀ, where the adapter's addmm adds it
        return x, uc, z

    def loss_and_grad(self, r, y, scale, want_grad: bool, lse=None):
        """(Σ loss over the chunk, lse, dz in the compute dtype or None, x, u_c).

        The fp32 logits are shifted, exponentiated, summed and turned into dz = (e − Σe·onehot)·(scale/Σe) in place,
        then cast into z's buffer (same-dtype in-place ops: on CPU a mixed-dtype `out=` is ~20× slower than them).
        """
        x, uc, z = self.logits(r)
        n = z.shape[0]
        f = self.fbuf[:n]
        if f is not z:
            f.copy_(z)
        t = None
        if self.softcap is None:
            target = f.gather(1, y.unsqueeze(1)).squeeze(1)
            shift = f.amax(1, keepdim=True) if lse is None else lse.unsqueeze(1)
            e = f.sub_(shift)
        else:  # fp32: z ← cap·tanh(z / cap), keeping tanh for the gradient
            t = torch.tanh(f.div_(self.softcap), out=self.tbuf[:n])
            f.copy_(t).mul_(self.softcap)
            target = f.gather(1, y.unsqueeze(1)).squeeze(1)
            shift = f.amax(1, keepdim=True) if lse is None else lse.unsqueeze(1)
            e = f.sub_(shift)
        e.exp_()  # (c, V) fp32: exp(z − max), or the softmax itself when shifted by the saved logsumexp
        if lse is None:
            s = e.sum(1, keepdim=True)
            lse = (shift + s.log()).squeeze(1)
        else:
            s = torch.ones_like(shift)
        total = (lse - target).sum()
        if not want_grad:
            return total, lse, None, x, uc
        e.scatter_add_(1, y.unsqueeze(1), -s)  # e − Σe·onehot(label) = Σe·(softmax − onehot)
        e.mul_(scale / s)
        if t is not None:
            e.mul_(t.square_().neg_().add_(1))  # d cap·tanh(z/cap) / dz = 1 − tanh²
        return total, lse, z if e is z else z.copy_(e), x, uc

    def grads_into(self, dz, r, x, uc, g: _Grads) -> None:
        """Scatter one chunk's input gradients into g.h / g.u, accumulate the weight gradients (fp32)."""
        if g.h is not None:
            g.h.index_copy_(0, r, (dz @ self.weight).to(g.h.dtype))  # (c, V) @ (V, H)
        if g.u is not None:
            g.u.index_copy_(0, r, (dz @ self.w2).to(g.u.dtype))  # (c, V) @ (V, r)
        if g.w is not None:
            _accumulate(g.w, dz.t(), x)  # (V, c) @ (c, H)
        if g.w2 is not None:
            _accumulate(g.w2, dz.t(), uc)
        if g.b is not None:
            g.b.add_(dz.sum(0, dtype=torch.float32))


@dataclass
class _Grads:
    h: torch.Tensor | None
    w: torch.Tensor | None
    b: torch.Tensor | None
    u: torch.Tensor | None
    w2: torch.Tensor | None

    @classmethod
    def zeros(cls, h, weight, bias, u, w2, needs):
        def f32(t, need):
            return torch.zeros(t.shape, dtype=torch.float32, device=t.device) if need else None

        return cls(torch.zeros_like(h) if needs[0] else None, f32(weight, needs[1]), f32(bias, needs[2]),
                   torch.zeros_like(u) if needs[3] else None, f32(w2, needs[4]))

    def out(self, weight, bias, w2) -> tuple:
        """In the inputs' dtypes (the weight gradients were accumulated in fp32)."""
        return (self.h, _cast_or_none(self.w, weight), _cast_or_none(self.b, bias), self.u,
                _cast_or_none(self.w2, w2))


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc in fp32; on CUDA without rounding the product to the inputs' dtype first."""
    if acc.device.type == "cuda" and a.dtype in (torch.float16, torch.bfloat16):
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (TypeError, RuntimeError):
            pass
    acc.add_(a @ b)


def _cast_or_none(t, like):
    return None if t is None else t.to(like.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, u, w2, rows, targets, denom, opts: _Opts):
        ctx.set_materialize_grads(False)
        ctx.opts = opts
        want_grad = any(opts.needs)
        in_forward = want_grad and not opts.recompute
        scale = 1.0 / denom  # d loss / d (summed loss), as the stock path's division by the count
        total = torch.zeros((), dtype=torch.float32, device=weight.device)
        lses = []
        with torch.autocast(weight.device.type, enabled=False):
            chunks = _Chunks(h, weight, bias, u, w2, opts, rows.numel())
            grads = _Grads.zeros(h, weight, bias, u, w2, opts.needs if in_forward else (False,) * 5)
            for start in range(0, rows.numel(), opts.chunk):
                r, y = rows[start:start + opts.chunk], targets[start:start + opts.chunk]
                part, lse, dz, x, uc = chunks.loss_and_grad(r, y, scale, in_forward)
                total += part
                if opts.recompute:
                    lses.append(lse)
                if dz is not None:
                    chunks.grads_into(dz, r, x, uc, grads)
        if opts.recompute and want_grad:
            lse_all = torch.cat(lses) if lses else torch.zeros(0, device=weight.device)
            ctx.save_for_backward(h, weight, bias, u, w2, rows, targets, denom, lse_all)
        elif in_forward:
            ctx.save_for_backward(*grads.out(weight, bias, w2))
        return total / denom

    @staticmethod
    def backward(ctx, g):
        opts: _Opts = ctx.opts
        if g is None or not any(opts.needs):
            return (None,) * 9
        if not opts.recompute:  # the gradients of the loss were computed in the forward: scale by the upstream one
            gh, gw, gb, gu, gw2 = (None if t is None else t * g.to(t.dtype) for t in ctx.saved_tensors)
            return gh, gw, gb, gu, gw2, None, None, None, None
        h, weight, bias, u, w2, rows, targets, denom, lse_all = ctx.saved_tensors
        scale = g.to(torch.float32) / denom
        with torch.autocast(weight.device.type, enabled=False):
            chunks = _Chunks(h, weight, bias, u, w2, opts, rows.numel())
            grads = _Grads.zeros(h, weight, bias, u, w2, opts.needs)
            for start in range(0, rows.numel(), opts.chunk):
                r, y = rows[start:start + opts.chunk], targets[start:start + opts.chunk]
                _, _, dz, x, uc = chunks.loss_and_grad(r, y, scale, True, lse=lse_all[start:start + opts.chunk])
                chunks.grads_into(dz, r, x, uc, grads)
        return (*grads.out(weight, bias, w2), None, None, None, None)


# ---- per-token log-probabilities of a frozen head (TRL's fused LM head, `integrations.trl`) -------------------------

#: the optional per-token outputs of `linear_log_probs`, in TRL's order (after `log_probs`).
LOG_PROB_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def linear_log_probs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                     bias: torch.Tensor | None = None, temperature: float = 1.0, softcap: float | None = None,
                     logit_scale: float = 1.0, outputs: tuple[str, ...] = LOG_PROB_OUTPUTS,
                     low_rank: tuple[torch.Tensor, torch.Tensor] | None = None,
                     chunk_size: int | None = None) -> tuple[torch.Tensor | None, ...]:
    """Per-token statistics of p = softmax(z), z = cap·tanh(logit_scale·(x·Wᵀ + u·W2ᵀ + b) / cap) / temperature,
    chunk by chunk (no (N, vocab) tensor beyond one chunk's buffers), for a **frozen** head W (and W2).

    ``hidden`` (N, H), ``weight`` (V, H), ``targets`` (N,) in [0, V); ``low_rank=(u, w2)``, u (N, k) and w2 (V, k),
    adds u·W2ᵀ to the logits (e.g. trained token columns: `layers.TiedTokenHead.low_rank`). Returns ``(log_probs,
    entropy, log_sum_sq_probs, mean_logits, is_top1)``, each (N,) fp32 (``is_top1`` bool), ``None`` when not in
    ``outputs``: log p[target], −Σ p·log p, log Σ p², mean z, and whether the target is the first argmax of z.
    Gradients reach ``hidden`` and ``u`` through ``log_probs`` and ``entropy``; both are computed in the forward,
    per chunk, as vectors of their width (d log p_t / dx = c·(onehot − p)·W and d H / dx = −c·(p ⊙ (z − Σ p·z))·W,
    c the transform's derivative; the same with W2 for u), and the backward only combines them with the incoming
    gradients: exact for any upstream. A head that requires grad is refused (ValueError).
    """
    u, w2 = low_rank if low_rank is not None else (None, None)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (weight, bias, w2)):
        raise ValueError("linear_log_probs takes a frozen head: the weight (or bias, or w2) requires grad")
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and hidden.requires_grad, False, False, grad_on and u is not None and u.requires_grad, False)
    opts = _Opts(chunk=int(chunk_size) if chunk_size else auto_chunk_size(weight.shape[0], weight.device),
                 softcap=float(softcap) if softcap else None, needs=needs, recompute=False,
                 dtype=_compute_dtype(weight.device, hidden.dtype))
    transform = (float(logit_scale), 1.0 / float(temperature), tuple(outputs))
    return _LinearLogProbs.apply(hidden, weight, bias, targets, u, w2, opts, transform)


class _LinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, u, w2, opts: _Opts, transform):
        scale, inv_t, outputs = transform
        n_rows, vocab, dev = h.shape[0], weight.shape[0], weight.device
        out = {k: torch.empty(n_rows, dtype=torch.float32, device=dev) for k in ("log_probs", *outputs)
               if k != "is_top1"}
        top1 = torch.empty(n_rows, dtype=torch.bool, device=dev) if "is_top1" in outputs else None
        ctx.set_materialize_grads(False)

        def zeros(t, need):  # per-row gradient vectors of an input, fp32
            return torch.zeros(t.shape, dtype=torch.float32, device=t.device) if need else None

        # d log p / d input and d entropy / d input, per row: for hidden (through W) and for u (through W2)
        ga = [zeros(h, opts.needs[0]), zeros(u, opts.needs[3]) if u is not None else None]
        gb = [zeros(t, True) if t is not None and "entropy" in outputs else None for t in ga]
        with torch.autocast(dev.type, enabled=False):
            chunks = _Chunks(h, weight, bias, u, w2, opts, n_rows)
            mats = (chunks.weight, chunks.w2)
            ebuf = torch.empty_like(chunks.fbuf)
            for start in range(0, n_rows, opts.chunk):
                r = torch.arange(start, min(start + opts.chunk, n_rows), device=dev)
                sl, y = slice(start, start + r.numel()), targets[start:start + r.numel()].to(dev)
                _, _, z = chunks.logits(r)
                f = chunks.fbuf[:r.numel()]
                if f is not z:
                    f.copy_(z)
                if scale != 1.0:
                    f.mul_(scale)
                dcap = None
                if opts.softcap is not None:  # z = cap·tanh(y / cap); keep 1 − tanh² for the gradient
                    dcap = torch.tanh(f.div_(opts.softcap), out=chunks.tbuf[:r.numel()])
                    f.copy_(dcap).mul_(opts.softcap)
                    dcap.square_().neg_().add_(1)
                if inv_t != 1.0:
                    f.mul_(inv_t)  # f = z (fp32), the transformed logits
                if "mean_logits" in out:
                    out["mean_logits"][sl] = f.sum(1) / vocab
                if top1 is not None:
                    top1[sl] = f.argmax(1) == y
                target = f.gather(1, y.unsqueeze(1)).squeeze(1)
                m = f.amax(1, keepdim=True)
                e = torch.exp(f.sub_(m), out=ebuf[:r.numel()])  # f = z − max, e = exp(z − max)
                s = e.sum(1)
                out["log_probs"][sl] = target - m.squeeze(1) - s.log()
                ef = (e.unsqueeze(1) @ f.unsqueeze(2)).view(-1) / s  # Σ p·(z − max), without an (n, V) product
                if "entropy" in out:
                    out["entropy"][sl] = s.log() - ef
                if "log_sum_sq_probs" in out:
                    out["log_sum_sq_probs"][sl] = (e.unsqueeze(1) @ e.unsqueeze(2)).view(-1).log() - 2 * s.log()
                if not any(t is not None for t in ga):
                    continue
                p = e.div_(s.unsqueeze(1))  # (n, V) softmax
                if any(t is not None for t in gb):  # dH/dz = −p ⊙ (z − Σ p·z)
                    _chain_into(f.sub_(ef.unsqueeze(1)).mul_(p).neg_(), dcap, inv_t * scale, z)
                    _rows_into(gb, mats, z, sl)
                a = p.neg_().scatter_add_(1, y.unsqueeze(1), torch.ones_like(s).unsqueeze(1))  # onehot − p
                _chain_into(a, dcap, inv_t * scale, z)
                _rows_into(ga, mats, z, sl)
        ctx.save_for_backward(*ga, *gb)
        ctx.dtypes = (h.dtype, None if u is None else u.dtype)
        ctx.mark_non_differentiable(*(x for k, x in out.items() if k in ("log_sum_sq_probs", "mean_logits")),
                                    *([top1] if top1 is not None else []))
        return tuple(top1 if k == "is_top1" else out.get(k) for k in ("log_probs", *LOG_PROB_OUTPUTS))

    @staticmethod
    def backward(ctx, g_logp, g_ent, *_):
        ga_h, ga_u, gb_h, gb_u = ctx.saved_tensors
        grads = []
        for a, b, dtype in ((ga_h, gb_h, ctx.dtypes[0]), (ga_u, gb_u, ctx.dtypes[1])):
            g = None
            if g_logp is not None and a is not None:
                g = a * g_logp.float().unsqueeze(1)
            if g_ent is not None and b is not None:
                g = b * g_ent.float().unsqueeze(1) if g is None else g.addcmul_(b, g_ent.float().unsqueeze(1))
            grads.append(None if g is None else g.to(dtype))
        return grads[0], None, None, None, grads[1], None, None, None


def _rows_into(store: list, mats: tuple, dz: torch.Tensor, sl: slice) -> None:
    """store[i][sl] ← dz·mats[i] (fp32) for each input that wants its gradient: (n, V) @ (V, H or k)."""
    for t, mat in zip(store, mats, strict=True):
        if t is not None:
            t[sl] = dz @ mat


def _chain_into(dz: torch.Tensor, dcap: torch.Tensor | None, chain: float, out: torch.Tensor) -> None:
    """out ← dz·chain (·(1 − tanh²) under a soft-cap), in out's dtype: d/d(x·Wᵀ + b) from d/dz."""
    if dcap is not None:
        dz.mul_(dcap)
    if chain != 1.0:
        dz.mul_(chain)
    if out is not dz:
        out.copy_(dz)
