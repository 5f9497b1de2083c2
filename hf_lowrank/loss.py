"""Linear + cross-entropy without the (batch, sequence, vocab) logits, and the causal-LM forward that uses it.

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

Pure torch (a `torch.autograd.Function`), CPU and GPU alike; nothing here imports hf_lowrank or the Trainer.

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
    saved hidden states (one more head matmul; the same memory). Either way the gradient is exact for any upstream
    scalar (gradient-accumulation scaling, AMP loss scaling). Without grad mode nothing but the loss is computed.

``fused_lm_supported(model) -> True | str``
    True when a transformers causal LM can take the fused path, else the reason it cannot (for a summary line). It
    needs: a decoder (``get_decoder()``, else ``getattr(model, model.base_model_prefix)``) that is a child of the
    model; ``get_output_embeddings()`` returning a float ``nn.Linear`` or an hf_lowrank ``LoraLinear`` around one
    (handled exactly: the adapter's low-rank term joins the chunked matmul; a 4-bit or 8-bit head is refused);
    ``loss_function`` being transformers' ``ForCausalLMLoss``; and a ``forward`` whose source (read with ``ast``)
    calls the decoder, computes ``logits = self.<head>(…)``, changes the logits only by an upcast or inside an
    ``if …final_logit_softcapping…`` block (read from the config), and assigns ``loss`` only from
    ``self.loss_function(…)`` (so no logit scaling — Cohere's ``logit_scale``, Granite's ``logits_scaling``, … — and
    no auxiliary loss, e.g. MoE router losses, is silently dropped: those models keep the stock path).

``fused_causal_lm_forward(model, input_ids=None, attention_mask=None, labels=None, num_items_in_batch=None, **kw)``
    Runs the decoder with the remaining keyword arguments (``position_ids``, ``inputs_embeds``, ``use_cache``, …),
    then ``linear_cross_entropy`` over its last hidden state; honours ``shift_labels`` (padding-free collators) and
    ``ignore_index``. Returns ``CausalLMOutputWithPast(loss=…, logits=None, …)``: **no logits**.

``enable_fused_loss(model, chunk_size=None, recompute=False) -> str`` / ``disable_fused_loss(model) -> None`` /
``fused_loss_status(model) -> str`` (the same summary line for a model as it is now)
    Installs an instance-level ``model.forward`` (no class is patched) that takes the fused path only when
    ``model.training`` and ``labels`` are given; evaluation, generation and label-less calls (TRL's or the Trainer's
    own losses, label smoothing, ``compute_loss_func``) run the original forward unchanged. The wrapper keeps the
    original signature (``inspect.signature(model.forward)`` is unchanged, so the Trainer's
    ``model_accepts_loss_kwargs`` still sees ``**kwargs`` and passes ``num_items_in_batch``; ``generate`` validates
    against it too) and has no ``__wrapped__`` (so accelerate's ``unwrap_model`` keeps it). Calls with TRL's
    ``fused_lm_head=True`` go to the forward underneath (TRL's own chunked head, see below). Returns the summary
    line: ``"fused linear+cross-entropy (chunks of N tokens, …)"`` or ``"stock (<reason>)"``; calling it again
    updates the settings. ``disable_fused_loss`` restores the original forward (or, when something has wrapped ours
    since, leaves ours underneath passing everything through). Everything per instance lives in the model's
    ``__dict__``, so ``copy.deepcopy(model)`` (TRL's reference models) gives a copy that runs its own weights; a
    model with the wrapper cannot be pickled whole (``torch.save(model)``; ``save_pretrained`` is unaffected).
    Checked on every call, so a head swapped or partitioned later (DeepSpeed ZeRO-3) falls back to the stock path
    with one warning; a MoE model called with ``output_router_logits`` takes the stock path (its router loss).

Wiring (for the Trainer integration)
------------------------------------
Call ``enable_fused_loss(model)`` once the model is built and injected, before ``Trainer(...)`` wraps it: at the end
of ``inject()`` / ``from_pretrained()`` (it is a no-op returning ``"stock (<reason>)"`` for anything but a supported
causal LM, so it can be called unconditionally), and in ``LowRankCallback.on_init_end`` for models injected
elsewhere (not ``on_train_begin``: by then accelerate has wrapped ``model.forward`` in autocast under
``bf16=True``, and a wrapper installed on top of that would run the fused path outside autocast). Print
``fused_loss_status(model)`` in the training summary (``loss path : fused linear+cross-entropy (chunks of 128
tokens, …)``). TRL 1.16's ``SFTTrainer`` needs no more: it installs its own chunked head
(``trl.trainer.utils.add_fused_lm_head``) on top of whatever forward the model has and calls
``model(..., fused_lm_head=True)``, which computes loss, entropy and token accuracy per chunk without logits
either; that call passes through this wrapper untouched, whichever was installed first (and its label-less calls,
for label smoothing or ``compute_loss_func``, get the stock logits).

Tolerances (tests/test_loss.py): against the stock ``model(input_ids, labels=…)``, fp32 loss and every gradient
within 1e-5 relative (max |Δ| / max |ref|); bf16 within 1e-3 on the loss and 2e-2 on each gradient (bf16 rounds at
2⁻⁸; the chunked matmuls and the fp32 accumulation of ∂W round differently from the one big matmul).
"""

from __future__ import annotations

import ast
import functools
import inspect
import logging
import textwrap
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("hf_lowrank")

__all__ = [
    "auto_chunk_size",
    "disable_fused_loss",
    "enable_fused_loss",
    "fused_causal_lm_forward",
    "fused_loss_status",
    "fused_lm_supported",
    "linear_cross_entropy",
]

#: bytes of fp32 logits one chunk may hold, by device type (the chunk's other temporaries are about 1.5× that).
CHUNK_BYTES = {"cpu": 64 * 2**20, "cuda": 256 * 2**20}
_ATTR = "_hf_lowrank_fused_loss"


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
    opts = _Opts(chunk=chunk, softcap=float(softcap) if softcap else None, needs=needs, recompute=recompute,
                 dtype=_compute_dtype(device, h.dtype))
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


# ---- which models can take it --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    decoder_name: str
    head_name: str
    softcap_attr: bool  # the forward soft-caps with config.final_logit_softcapping
    cast_hidden: bool  # the forward casts the hidden states to the head's dtype (Mamba-style)
    router_aux: bool  # the forward adds a router loss when output_router_logits (then the stock path is taken)


def _output_head(model: nn.Module):
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if get is not None else None
    except (NotImplementedError, AttributeError):
        return None


def _decoder(model: nn.Module):
    get = getattr(model, "get_decoder", None)
    dec = None
    try:
        dec = get() if get is not None else None
    except (NotImplementedError, AttributeError, ValueError):
        dec = None
    if dec is None or dec is model:
        dec = getattr(model, getattr(model, "base_model_prefix", "") or "model", None)
    return dec if isinstance(dec, nn.Module) and dec is not model else None


def _is_adapter(head: nn.Module) -> bool:
    """An hf_lowrank `LoraLinear`, recognised by shape (this module imports nothing from hf_lowrank)."""
    return all(hasattr(head, a) for a in ("base_layer", "lora_A", "lora_B", "scaling", "merged", "disabled"))


def _head_reason(head: nn.Module) -> str | None:
    """None when the head's weight can be used directly, else why not."""
    base = head.base_layer if _is_adapter(head) else head
    if not isinstance(base, nn.Linear):
        return f"the output head is a {type(base).__name__}, not nn.Linear"
    w = getattr(base, "weight", None)
    if w is None or hasattr(w, "quant_state") or not w.is_floating_point() or w.dim() != 2:
        return f"the output head's weight is quantized ({type(base).__name__})"
    return None


def _child_name(model: nn.Module, module: nn.Module) -> str | None:
    return next((n for n, m in model.named_children() if m is module), None)


def _inside_if(node: ast.AST, parents: dict, word: str) -> bool:
    """Whether `node` sits in an `if` whose test mentions `word`."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and word in ast.unparse(node.test):
            return True
    return False


_NO_OP_METHODS = ("float", "contiguous")


def _strip_no_ops(value: ast.AST) -> ast.AST:
    """`x.float().contiguous()` -> `x`."""
    while (isinstance(value, ast.Call) and not value.args and not value.keywords
           and isinstance(value.func, ast.Attribute) and value.func.attr in _NO_OP_METHODS):
        value = value.func.value
    return value


@functools.lru_cache(maxsize=64)
def _forward_plan(cls: type, decoder_name: str, head_name: str) -> _Plan | str:
    """Read the class's forward (ast): what it does between the decoder and the loss must be what we replicate."""
    name = cls.__name__
    fn = inspect.unwrap(cls.forward)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return f"{name}.forward's source is not readable"
    func = tree.body[0]
    parents = {child: node for node in ast.walk(func) for child in ast.iter_child_nodes(node)}

    def self_call(call: ast.AST, attr: str) -> bool:
        f = getattr(call, "func", None)
        return (isinstance(call, ast.Call) and isinstance(f, ast.Attribute) and f.attr == attr
                and isinstance(f.value, ast.Name) and f.value.id == "self")

    calls_decoder = head_assigned = softcap = cast_hidden = router_aux = False
    for node in ast.walk(func):
        if self_call(node, decoder_name):
            calls_decoder = True
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        names = {t.id for t in targets if isinstance(t, ast.Name)}
        line = ast.unparse(node).splitlines()[0] if names else ""
        if "logits" in names:
            value = _strip_no_ops(node.value) if isinstance(node, ast.Assign) else None
            if value is not None and self_call(value, head_name) and not head_assigned and len(value.args) == 1 \
                    and not value.keywords:
                arg = ast.unparse(value.args[0])
                head_assigned = True
                if ".to(" in arg and arg.endswith(f"self.{head_name}.weight.dtype)"):
                    cast_hidden = True
                elif not isinstance(value.args[0], (ast.Name, ast.Subscript)):
                    return f"{name}.forward feeds the head something else than the hidden states: `{line}`"
            elif value is not None and ast.unparse(value) == "logits":
                pass  # logits = logits.float() / .contiguous()
            elif _inside_if(node, parents, "final_logit_softcapping"):
                softcap = True
            else:
                return f"{name}.forward changes the logits: `{line}`"
        if "loss" in names:
            value = node.value
            ok = isinstance(node, ast.Assign) and (
                (isinstance(value, ast.Constant) and value.value is None) or self_call(value, "loss_function"))
            if not ok and _inside_if(node, parents, "output_router_logits"):
                ok = router_aux = True
            if not ok:
                return f"{name}.forward computes its own loss: `{line}`"
    if not calls_decoder:
        return f"{name}.forward does not call self.{decoder_name}"
    if not head_assigned:
        return f"{name}.forward does not compute logits = self.{head_name}(…)"
    return _Plan(decoder_name, head_name, softcap, cast_hidden, router_aux)


def _router_logits_on(model: nn.Module, kwargs: dict) -> bool:
    value = kwargs.get("output_router_logits")
    return bool(getattr(model.config, "output_router_logits", False) if value is None else value)


def _plan(model: nn.Module) -> _Plan | str:
    config = getattr(model, "config", None)
    if config is None:
        return "not a transformers model (no config)"
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    head = _output_head(model)
    if head is None:
        return "no output embeddings (get_output_embeddings() is None)"
    reason = _head_reason(head)
    if reason:
        return reason
    decoder = _decoder(model)
    if decoder is None:
        return "no decoder module (get_decoder())"
    decoder_name, head_name = _child_name(model, decoder), _child_name(model, head)
    if decoder_name is None or head_name is None:
        return "the decoder or the head is not a direct child of the model"
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:  # pragma: no cover - transformers is a dependency
        return "transformers' ForCausalLMLoss is not importable"
    if getattr(model, "loss_function", None) is not ForCausalLMLoss:
        return f"the loss is not transformers' ForCausalLMLoss (loss_type={getattr(model, 'loss_type', None)!r})"
    return _forward_plan(type(model), decoder_name, head_name)


def fused_lm_supported(model: nn.Module) -> bool | str:
    """True when `model` can take the fused path; otherwise the reason, for a summary line."""
    plan = _plan(model)
    return True if isinstance(plan, _Plan) else plan


def _softcap_of(model: nn.Module) -> float | None:
    config = model.config
    value = getattr(config, "final_logit_softcapping", None)
    if value is None and hasattr(config, "get_text_config"):
        value = getattr(config.get_text_config(), "final_logit_softcapping", None)
    return value


# ---- the fused causal-LM forward -----------------------------------------------------------------------------------

_LOSS_KEYS = ("labels", "shift_labels", "num_items_in_batch", "ignore_index", "return_dict", "logits_to_keep")


def fused_causal_lm_forward(model: nn.Module, input_ids=None, attention_mask=None, labels=None,
                            num_items_in_batch=None, *, shift_labels=None, ignore_index: int = -100,
                            chunk_size: int | None = None, softcap: float | None | str = "config",
                            recompute: bool = False, return_dict: bool | None = None, logits_to_keep=0, **kwargs):
    """The decoder, then `linear_cross_entropy` over its last hidden state: a `CausalLMOutputWithPast` whose
    `logits` is None. `softcap="config"` reads `final_logit_softcapping` when the model's forward applies it."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    if labels is None and shift_labels is None:
        raise ValueError("fused_causal_lm_forward needs labels (or shift_labels): it returns a loss, not logits")
    if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        raise ValueError("fused_causal_lm_forward scores every position; logits_to_keep must be 0")
    plan = _plan(model)
    if isinstance(plan, str):
        raise ValueError(f"this model cannot take the fused path: {plan}")
    if plan.router_aux and _router_logits_on(model, kwargs):
        raise ValueError("output_router_logits is on: the model adds its router loss, which the fused path does not")
    if softcap == "config":
        softcap = _softcap_of(model) if plan.softcap_attr else None
    decoder = getattr(model, plan.decoder_name)
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    head = getattr(model, plan.head_name)
    base = head.base_layer if _is_adapter(head) else head
    weight, bias = _full(base.weight), _full(base.bias)
    if plan.cast_hidden:
        hidden = hidden.to(weight.dtype)
    low_rank = None
    if _is_adapter(head) and not head.disabled and not head.merged:
        hidden = hidden.to(weight.device)
        # LoraLinear: out + s·(dropout(x)·Aᵀ)·Bᵀ in the activations' dtype; its own dropout when it has one
        x_in, scaling = head._dropout(hidden) if hasattr(head, "_dropout") else (head.dropout(hidden), head.scaling)
        a = F.linear(x_in, _full(head.lora_A.weight).to(hidden.dtype))  # (…, H) -> (…, r)
        low_rank = (a * scaling, _full(head.lora_B.weight).to(hidden.dtype))
    target = labels if shift_labels is None else shift_labels
    loss = linear_cross_entropy(hidden, weight, target, bias=bias, ignore_index=ignore_index,
                                num_items_in_batch=num_items_in_batch, shift=shift_labels is None, softcap=softcap,
                                chunk_size=chunk_size, low_rank=low_rank, recompute=recompute)
    fields = {f for f in CausalLMOutputWithPast.__dataclass_fields__}
    extra = {}
    for name in ("cache", "past_key_values", "hidden_states", "attentions"):
        if name in fields and getattr(out, name, None) is not None:
            extra[name] = getattr(out, name)
    result = CausalLMOutputWithPast(loss=loss, logits=None, **extra)
    return result.to_tuple() if return_dict is False else result


def _full(t):
    """A DTensor (FSDP2) gathered to a plain tensor; anything else as it is."""
    if t is not None and type(t).__name__ == "DTensor" and hasattr(t, "full_tensor"):
        return t.full_tensor()
    return t


# ---- the instance-level forward wrapper ----------------------------------------------------------------------------


@dataclass
class _State:
    stock: object  # the forward underneath (a bound method; deepcopy rebinds it to the copy)
    wrapper: object  # our bound method, as installed
    chunk_size: int | None
    recompute: bool
    signature: inspect.Signature
    enabled: bool = True
    warned: bool = False


def _description(model: nn.Module, state: _State) -> str:
    head = _output_head(model)
    base = head.base_layer if _is_adapter(head) else head
    chunk = state.chunk_size or auto_chunk_size(base.weight.shape[0], base.weight.device)
    how = "backward recomputes the logits" if state.recompute else "gradients in the forward"
    return f"fused linear+cross-entropy (chunks of {chunk} tokens, {how}; no logits in training forwards)"


def enable_fused_loss(model: nn.Module, chunk_size: int | None = None, recompute: bool = False) -> str:
    """Route training forwards with labels through the fused path; returns the summary line (see module docstring)."""
    reason = fused_lm_supported(model)
    if reason is not True:
        disable_fused_loss(model)
        return f"stock ({reason})"
    state = model.__dict__.get(_ATTR)
    if state is not None:
        state.chunk_size, state.recompute, state.enabled = chunk_size, recompute, True
        return _description(model, state)
    stock = model.forward
    signature = inspect.signature(stock)

    def forward(self, *args, **kwargs):
        # Everything per instance comes from self's state (not from this closure), so copy.deepcopy(model) gives a
        # copy whose forward runs the copy.
        st = self.__dict__.get(_ATTR)
        if st is None:
            return type(self).forward(self, *args, **kwargs)
        if not st.enabled:
            return st.stock(*args, **kwargs)
        if args:
            try:
                kwargs = _as_kwargs(st.signature, args, kwargs)
            except TypeError:
                return st.stock(*args, **kwargs)
        if (not self.training or kwargs.get("labels") is None or kwargs.get("fused_lm_head")
                or kwargs.get("logits_to_keep") not in (None, 0) or not _fusable_now(self, st, kwargs)):
            return st.stock(**kwargs)
        kwargs.pop("fused_lm_head", None)
        return fused_causal_lm_forward(self, chunk_size=st.chunk_size, recompute=st.recompute, **kwargs)

    # The signature the Trainer (model_accepts_loss_kwargs, unused columns) and generate() inspect: the original's.
    forward.__signature__ = signature.replace(parameters=[
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *signature.parameters.values()])
    forward.__doc__ = getattr(stock, "__doc__", None)
    forward.__name__ = forward.__qualname__ = "forward"
    bound = types.MethodType(forward, model)
    model.__dict__[_ATTR] = _State(stock, bound, chunk_size, recompute, signature)
    model.forward = bound
    return _description(model, model.__dict__[_ATTR])


def fused_loss_status(model: nn.Module) -> str:
    """The summary line for a model as it is now: what `enable_fused_loss` returned, or why the path is stock."""
    state = model.__dict__.get(_ATTR)
    if state is not None and state.enabled:
        return _description(model, state)
    reason = fused_lm_supported(model)
    return "stock (fused loss not enabled)" if reason is True else f"stock ({reason})"


def disable_fused_loss(model: nn.Module) -> None:
    """Back to the stock forward. When something has wrapped ours since (TRL, accelerate), ours stays underneath
    it and passes every call through."""
    state = model.__dict__.get(_ATTR)
    if state is None:
        return
    if model.__dict__.get("forward") is not state.wrapper:
        state.enabled = False
        return
    del model.__dict__[_ATTR]
    if getattr(state.stock, "__self__", None) is model and getattr(state.stock, "__func__", None) is getattr(
            type(model), "forward", None):
        del model.__dict__["forward"]  # the class's own forward again
    else:
        model.forward = state.stock


def _as_kwargs(signature: inspect.Signature, args, kwargs) -> dict:
    bound = signature.bind_partial(*args, **kwargs)
    out = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind == inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind == inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError("extra positional arguments")
        else:
            out[name] = value
    return out


def _fusable_now(model: nn.Module, st: _State, kwargs: dict) -> bool:
    """Checks that can change after enable_fused_loss: the head (swapped, adapted, partitioned), router losses."""
    plan = _plan(model)
    if isinstance(plan, str):
        _warn_once(st, f"hf_lowrank: {plan}; using the stock loss path")
        return False
    if plan.router_aux and _router_logits_on(model, kwargs):
        return False  # the stock forward adds the router loss
    head = getattr(model, plan.head_name)
    w = getattr(head.base_layer if _is_adapter(head) else head, "weight", None)
    if hasattr(w, "ds_id") or w.numel() == 0:
        _warn_once(st, "hf_lowrank: the output head is partitioned (DeepSpeed ZeRO-3); using the stock loss path")
        return False
    return True


def _warn_once(st: _State, message: str) -> None:
    if not st.warned:
        st.warned = True
        logger.warning(message)
