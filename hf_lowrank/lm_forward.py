"""What a transformers causal LM's `forward` does between its decoder and its loss, read from its source (`ast`).

``forward_plan(cls, decoder_name, head_name) -> Plan | str`` (cached per class): a `Plan` when the forward does no
more than `fused_lm` replicates — calls ``self.<decoder>``, feeds ``self.<head>`` the decoder's last hidden state
unchanged (``slice_logits_to_keep`` aside), changes the logits only by an upcast or inside an
``if …final_logit_softcapping…`` block, never in place, and assigns ``loss`` only from ``self.loss_function(…)``
(or inside an ``if …output_router_logits…`` block: a MoE router loss) — else the reason, naming the line.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    decoder_name: str
    head_name: str
    softcap_attr: bool  # the forward soft-caps with config.final_logit_softcapping
    cast_hidden: bool  # the forward casts the hidden states to the head's dtype (Mamba-style)
    router_aux: bool  # the forward adds a router loss when output_router_logits (then the stock path is taken)


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
def forward_plan(cls: type, decoder_name: str, head_name: str) -> Plan | str:
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
    fed = None  # the name of what the head is fed (`hidden_states` in `self.lm_head(hidden_states[:, s, :])`)
    for node in ast.walk(func):
        if self_call(node, decoder_name):
            calls_decoder = True
        changed = _changed_in_place(node)
        if changed == "logits":
            return f"{name}.forward changes the logits in place: `{ast.unparse(node).splitlines()[0]}`"
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        names = {t.id for t in targets if isinstance(t, ast.Name)}
        line = ast.unparse(node).splitlines()[0] if names else ""
        if "logits" in names:
            value = _strip_no_ops(node.value) if isinstance(node, ast.Assign) else None
            if value is not None and self_call(value, head_name) and not head_assigned and len(value.args) == 1 \
                    and not value.keywords:
                arg = ast.unparse(value.args[0])
                head_assigned, fed = True, _base_name(value.args[0])
                if ".to(" in arg and arg.endswith(f"self.{head_name}.weight.dtype)"):
                    cast_hidden = True
                elif not isinstance(value.args[0], (ast.Name, ast.Subscript)):
                    return f"{name}.forward feeds the head something else than the hidden states: `{line}`"
            elif value is None or ast.unparse(value) != "logits":  # `logits.float()` / `.contiguous()` are fine
                if not _inside_if(node, parents, "final_logit_softcapping"):
                    return f"{name}.forward changes the logits: `{line}`"
                softcap = True
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
    for node in ast.walk(func):  # what the head reads must be the decoder's output, unchanged
        names = _assigned_names(node)
        if fed in names and not (isinstance(node, ast.Assign) and _decoder_output(node.value, fed)) \
                or fed is not None and _changed_in_place(node) == fed:
            return f"{name}.forward changes the hidden states before the head: `{ast.unparse(node).splitlines()[0]}`"
    return Plan(decoder_name, head_name, softcap, cast_hidden, router_aux)


def _assigned_names(node: ast.AST) -> set[str]:
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
        node, (ast.AugAssign, ast.AnnAssign)) else []
    return {t.id for t in targets if isinstance(t, ast.Name)}


def _base_name(expr: ast.AST) -> str | None:
    """`hidden_states` for `hidden_states`, `hidden_states[:, s, :]` or `hidden_states.to(dtype)`."""
    while isinstance(expr, ast.Subscript) or (isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute)):
        expr = expr.value if isinstance(expr, ast.Subscript) else expr.func.value
    return expr.id if isinstance(expr, ast.Name) else None


def _decoder_output(value: ast.AST, fed: str) -> bool:
    """`outputs.last_hidden_state` or `outputs[0]`, the decoder's last hidden state as the fused path reads it, or
    transformers' `slice_logits_to_keep(<that, or fed>, logits_to_keep)` (all of it: the fused path keeps all)."""
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "slice_logits_to_keep" \
            and value.args:
        value = value.args[0]
        if isinstance(value, ast.Name) and value.id == fed:
            return True
    return (isinstance(value, ast.Attribute) and value.attr == "last_hidden_state") or (
        isinstance(value, ast.Subscript) and isinstance(value.slice, ast.Constant) and value.slice.value == 0)


def _changed_in_place(node: ast.AST) -> str | None:
    """The name a statement changes in place: `x[...] = …`, `x[...] += …`, `x.<op>_(…)`."""
    if isinstance(node, (ast.Assign, ast.AugAssign)):
        for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
            if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name):
                return t.value.id
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name) \
            and node.func.attr.endswith("_") and not node.func.attr.startswith("_"):
        return node.func.value.id
    return None
