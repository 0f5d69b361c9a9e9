"""Apply, remove and combine decoded deltas, in place on the model's own tensors.

docs/design.md "Mechanism", steps 4-5, one validator, window w:

    4. θ_eval = θ_w + Σ_{i∈V} m_i Δ_i
    5. for each i in V: L_with = L(θ_eval); remove m_i Δ_i; L_without = L(θ_eval − m_i Δ_i);
       put it back **bit-exactly** (restore the saved values, not a float subtraction).

In code:

    for delta, m in zip(deltas, weights):
        add_(params, delta, m)                     # step 4: θ_eval
    for delta, m in zip(deltas, weights):          # step 5
        l_with = loss(model)
        saved = apply_(params, delta, -m)          # remove m_i Δ_i, keeping what was there
        l_without = loss(model)
        restore_(params, saved)                    # θ_eval again, bit for bit

A sparse part touches only its positions (`index_add_` on the flat view), so applying a `mask`
delta costs O(k), far below a forward pass; a dense part touches everything, and a low-rank part
(`Factored`: lowrank's factors, or a merge's stacked factors) is materialised into the parameter one
block at a time, in its fixed order, so no parameter-sized product is ever held.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .codec import Delta, Factored, Mixed, Part, Shapes, Sparse, densify, full

Saved = dict[str, Part]
"""Previous values at every touched position: Sparse(indices, old values) or a dense copy."""


def _flat(p: Tensor) -> Tensor:
    if not p.is_contiguous():
        raise ValueError("parameters must be contiguous to be updated in place")
    return p.view(-1)


@torch.no_grad()
def add_(params: dict[str, Tensor], delta: Delta, scale: float) -> None:
    """params += scale * delta, in place, without saving anything (θ_eval, the master)."""
    for name, part in delta.items():
        p = params[name]
        if isinstance(part, Mixed):
            add_(params, {name: part.low}, scale)
            part = part.sparse
        if isinstance(part, Factored):
            part.add_to(p.view(part.shape), scale)
        elif isinstance(part, Sparse):
            idx, vals = part.indices.to(p.device), part.values.to(p.device, p.dtype)
            _flat(p).index_add_(0, idx, vals, alpha=scale)
        else:
            p.add_(part.to(p.device, p.dtype).view_as(p), alpha=scale)


@torch.no_grad()
def apply_(params: dict[str, Tensor], delta: Delta, scale: float) -> Saved:
    """params += scale * delta, in place; returns the previous values of every touched position."""
    saved: Saved = {}
    for name, part in delta.items():
        p = params[name]
        if isinstance(part, Sparse):
            idx = part.indices.to(p.device)
            saved[name] = Sparse(idx, _flat(p).index_select(0, idx))
        else:
            saved[name] = p.detach().clone()
    add_(params, delta, scale)
    return saved


@torch.no_grad()
def restore_(params: dict[str, Tensor], saved: Saved) -> None:
    """Put back the values `apply_` saved: every parameter is bit-identical to before."""
    for name, part in saved.items():
        p = params[name]
        if isinstance(part, Sparse):
            _flat(p).index_copy_(0, part.indices, part.values)
        else:
            p.copy_(part)


def scaled(delta: Delta, factor: float) -> Delta:
    """`delta` with every value times `factor` (sparse parts keep their positions)."""
    return {name: _scaled(p, factor) for name, p in delta.items()}


def _scaled(p: Part, factor: float) -> Part:
    if isinstance(p, Mixed):
        return Mixed(p.low.scaled(factor), Sparse(p.sparse.indices, p.sparse.values * factor))
    if isinstance(p, Factored):
        return p.scaled(factor)
    return Sparse(p.indices, p.values * factor) if isinstance(p, Sparse) else p * factor


def _square(p: Part) -> float:
    """‖p‖²; a low-rank part's from its factors, plus what its sparse values add at their positions
    (‖L + S‖² = ‖L‖² + Σ_k (2 L_k + s_k) s_k: the positions of S are unique)."""
    if isinstance(p, Factored):
        return p.square()
    if isinstance(p, Mixed):
        s = p.sparse.values.double()
        low = p.low.at(p.sparse.indices).double()
        return max(0.0, p.low.square() + float(((2 * low + s) * s).sum()))
    values = p.values if isinstance(p, Sparse) else full(p)
    return float(values.double().square().sum())


def delta_norm(delta: Delta) -> float:
    """L2 norm over every part (float64 accumulation, so huge values give inf, not NaN)."""
    return math.sqrt(sum(_square(p) for p in delta.values()))


def to_dense(delta: Delta, shapes: Shapes) -> dict[str, Tensor]:
    """Dense fp32 tensors (zeros where a sparse part holds nothing)."""
    return densify(delta, shapes)


class applied_per_module:  # noqa: N801 (a context manager, named for how it reads at the call)
    """Forwards of `model` inside see `params + scale · delta`, but no parameter is changed for
    longer than the module that owns it takes to run: a forward pre-hook adds the delta's part to
    that one parameter in place (`add_`, the same kernel and so the same bits as `apply_`), the
    module runs, and its forward hook copies back a clone of that one parameter. Memory is one
    parameter's clone at a time, not a clone of every touched parameter (`apply_`'s saved values:
    a dense copy of every matrix a low-rank part touches, 27 GB at 7B), and the work is the
    parameter-sized adds and copies, on whatever device the model is on. A parameter two modules
    share (a tied output head) is applied when the first of them runs and restored after the last.

        with applied_per_module(model, params, term, -1.0):   # θ_eval without uid i
            losses = sequence_losses(model, pages, batch)

    Every forward inside must run each owning module once (a causal LM's forward does)."""

    def __init__(self, model: torch.nn.Module, params: dict[str, Tensor], delta: Delta, scale: float) -> None:
        self.model, self.params, self.delta, self.scale = model, params, delta, scale
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.saved: dict[str, Tensor] = {}
        self.pending: dict[str, int] = {}

    def __enter__(self) -> applied_per_module:
        owners: dict[int, list[tuple[torch.nn.Module, str]]] = {}
        for module in self.model.modules():
            for attr, p in module._parameters.items():
                if p is not None:
                    owners.setdefault(id(p), []).append((module, attr))
        by_module: dict[int, tuple[torch.nn.Module, list[str]]] = {}
        self.users: dict[str, int] = {}
        for name in self.delta:
            found = owners.get(id(self.params[name]), [])
            if not found:
                raise ValueError(f"{name}: no module of the model owns this parameter")
            self.users[name] = len(found)
            for module, _ in found:
                by_module.setdefault(id(module), (module, []))[1].append(name)
        for module, names in by_module.values():
            self.handles.append(
                module.register_forward_pre_hook(lambda _m, _a, names=names: self._apply(names))
            )
            self.handles.append(
                module.register_forward_hook(lambda _m, _a, _o, names=names: self._restore(names))
            )
        return self

    @torch.no_grad()
    def _apply(self, names: list[str]) -> None:
        for name in names:
            if name not in self.saved:
                self.saved[name] = self.params[name].detach().clone()
                self.pending[name] = self.users[name]
                add_(self.params, {name: self.delta[name]}, self.scale)

    @torch.no_grad()
    def _restore(self, names: list[str]) -> None:
        for name in names:
            self.pending[name] -= 1
            if self.pending[name] == 0:
                self.params[name].copy_(self.saved.pop(name))

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        with torch.no_grad():  # a forward that raised half-way: put back what it left applied
            for name, old in self.saved.items():
                self.params[name].copy_(old)
        self.saved.clear()
