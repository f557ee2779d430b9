"""The Gauss–Newton split of a model's Hessian: ∇²L = G + (∇²L − G).

G = (1/n)·Σᵢ JᵢᵀΛᵢJᵢ (Jᵢ example i's output Jacobian, Λᵢ the loss Hessian in the
outputs) needs the loss's ``kind`` ("cross_entropy" or "mse"). ``trace_gauss_newton``
estimates tr G from vector-Jacobian products only; ``exact_trace_gauss_newton``
computes it exactly from per-layer "ghost" norms and per-example Jacobians.
``residual_matvec`` is the non-Gauss–Newton part ∇²L − G as a matrix-free operator,
and ``trace_hessian`` is tr∇²L = tr G (exact) + tr(∇²L − G) (probed), the residual
being small near a minimizer and exactly traceless for ReLU networks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lnsgd.curvature.linearity import is_piecewise_linear
from lnsgd.curvature.operators import (
    HessianOperator,
    check_data,
    check_int,
    evaluation_mode,
    hessian_matvec,
    mean_and_stderr,
    no_autocast,
    rademacher,
    refuse_dropout,
    resolve_generator,
    to_model,
    trainable_parameters,
)
from lnsgd.curvature.trace import SplitTraceEstimate, TraceEstimate, choose_trace, exact_split, split_trace
from lnsgd.errors import LnsgdError

# ---------------------------------------------------------------------------
# Gauss–Newton trace from vector-Jacobian products.
# ---------------------------------------------------------------------------


def loss_kind(loss_fn) -> str | None:
    """"cross_entropy" or "mse" (the loss's ``.kind``; ``nn.CrossEntropyLoss`` with mean
    reduction is recognized), or None for a loss tr G cannot be computed for."""
    kind = getattr(loss_fn, "kind", None)
    if kind is None and isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.reduction == "mean":
        kind = "cross_entropy"  # label smoothing leaves the logit Hessian unchanged
    return kind if kind in ("cross_entropy", "mse") else None


# What a caller of each function here can do instead, in that function's own terms.
_INSTEAD_OF_GN = (
    "for other losses tr∇²L alone is estimate_trace(*hessian_matvec(model, loss_fn, inputs, targets), num_matvecs, method='xtrace')"
)


def _loss_kind(loss_fn, instead: str = _INSTEAD_OF_GN) -> str:
    kind = loss_kind(loss_fn)
    if kind is None:
        raise LnsgdError(
            "tr G (and the split tr∇²L built on it) needs a loss with .kind 'cross_entropy' or 'mse' "
            f"(lnsgd.curvature.cross_entropy_loss, smoothed_cross_entropy(p, C) or mse_loss); got {loss_fn!r}; {instead}"
        )
    return kind


def trace_gauss_newton(
    model,
    loss_fn,
    inputs,
    targets,
    num_samples: int = 100,
    generator: torch.Generator | None = None,
    chunk_size: int = 1024,
    *,
    per_class: bool | None = None,
    on_sample: Callable[[], None] | None = None,
) -> TraceEstimate:
    """tr G for the Gauss–Newton matrix G = (1/n)·Σᵢ Jᵢᵀ Hᵢ Jᵢ, without second derivatives.

    Jᵢ is the Jacobian of example i's output with respect to θ; Hᵢ the Hessian
    of the loss in the output: diag(pᵢ) − pᵢpᵢᵀ for cross-entropy (also for the
    label-smoothed loss: it does not depend on the target) and I for mse_loss
    (½‖f − y‖²). The kind comes from ``loss_fn.kind`` ("cross_entropy" or
    "mse"; the losses in this module carry it; ``nn.CrossEntropyLoss`` is
    recognized too).

    Only vector-Jacobian products: with vectors sᵢ such that E[sᵢsᵢᵀ] = Hᵢ and
    Rademacher signs rᵢ, one backward pass of Σᵢ rᵢ⟨fᵢ, sᵢ⟩ (s detached) gives
    g = Σᵢ rᵢJᵢᵀsᵢ, and E‖g‖²/n = tr G because the cross terms have mean zero
    (Hutchinson's estimator on JᵀHJ; cf. the sampled Gauss–Newton of Martens &
    Sutskever 2011 and BackPACK, Dangel, Kunstner & Hennig, ICLR 2020).
    - mse: sᵢ Rademacher in the outputs (E[ssᵀ] = I).
    - cross-entropy, ``per_class`` (default when C ≤ 32): Hᵢ = Σ_c p_c (e_c − p)(e_c − p)ᵀ
      is summed exactly, one backward per class with sᵢ = √p_c·(e_c − pᵢ) — C
      backward passes per sample, sharing one forward. On a 3-class MLP this
      had 7x less variance per second than sampling a class.
    - cross-entropy, ``per_class=False``: one backward with sᵢ = pᵢ − e_c,
      c ~ softmax(fᵢ), whose covariance is Hᵢ (the spec'd Monte-Carlo form).
    ‖g‖² is summed per chunk (cross terms between chunks also have mean zero).
    Result: mean over ``num_samples`` with its standard error; ``num_matvecs``
    counts backward passes. ``on_sample()`` is called after each sample.
    """
    kind = _loss_kind(loss_fn)
    check_int("num_samples", num_samples, 2)
    _, params = trainable_parameters(model)
    refuse_dropout(model)
    n = check_data(inputs, targets, chunk_size)
    gen = resolve_generator(generator)
    dtype, device = params[0].dtype, params[0].device
    samples = []
    backward_passes = 0

    def squared_norm_of_vjp(out: Tensor, s: Tensor, retain: bool) -> float:
        nonlocal backward_passes
        m = out.shape[0]
        r = rademacher((m,), gen, out.dtype, device).view(m, *([1] * (out.ndim - 1)))
        grads = torch.autograd.grad((out * (r * s)).sum(), params, allow_unused=True, retain_graph=retain)
        backward_passes += 1
        return sum(float(gr.double().pow(2).sum()) for gr in grads if gr is not None)

    with evaluation_mode(model), torch.enable_grad(), no_autocast(device):
        for _ in range(num_samples):
            total = 0.0
            for start in range(0, n, chunk_size):
                out = model(to_model(inputs[start : min(start + chunk_size, n)], dtype, device))
                if kind == "mse":
                    total += squared_norm_of_vjp(out, rademacher(tuple(out.shape), gen, out.dtype, device), False)
                    continue
                if out.ndim != 2:
                    raise LnsgdError(f"cross-entropy outputs must be (n, C) logits; got {tuple(out.shape)}")
                probs = out.detach().softmax(1)
                num_classes = out.shape[1]
                if per_class if per_class is not None else num_classes <= 32:
                    for c in range(num_classes):
                        s = -probs
                        s[:, c] += 1.0
                        s = s * probs[:, c : c + 1].sqrt()
                        total += squared_norm_of_vjp(out, s, retain=c < num_classes - 1)
                else:
                    cls = torch.multinomial(probs.to(gen.device), 1, generator=gen).squeeze(1).to(device)
                    total += squared_norm_of_vjp(out, probs - F.one_hot(cls, num_classes).to(probs.dtype), False)
            samples.append(total / n)
            if on_sample is not None:
                on_sample()
    value, stderr = mean_and_stderr(torch.tensor(samples))
    return TraceEstimate(value, stderr, backward_passes, "gauss_newton_vjp")


# ---------------------------------------------------------------------------
# tr G exactly, from ghost norms and per-example Jacobians.
# ---------------------------------------------------------------------------


def _output_hessians(kind: str, out: Tensor) -> Tensor:
    """Λᵢ = ∇²ℓᵢ in example i's outputs, (b, k, k), for the per-example loss ℓᵢ."""
    flat = out.reshape(out.shape[0], -1)
    if kind == "mse":  # ½‖f − y‖²
        return torch.eye(flat.shape[1], dtype=flat.dtype, device=flat.device).expand(flat.shape[0], -1, -1)
    p = flat.softmax(1)  # cross-entropy, label-smoothed or not: diag(p) − ppᵀ
    return torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)


_CONV = (nn.Conv1d, nn.Conv2d)


def _ghost_input_ndims(m: nn.Module) -> tuple[int, ...]:
    """Input ranks at which module m's per-example gradients are read off its input."""
    if isinstance(m, nn.Linear):
        return (2,)
    if isinstance(m, _CONV):
        if m.groups != 1 or m.padding_mode != "zeros" or (isinstance(m.padding, str) and m.padding != "valid"):
            return ()
        return (3,) if isinstance(m, nn.Conv1d) else (4,)
    if isinstance(m, nn.GroupNorm):
        return (2, 3, 4, 5) if m.affine else ()
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):  # eval mode: affine in the running statistics
        if not m.affine or m.running_mean is None:
            return ()
        return (2, 3) if isinstance(m, nn.BatchNorm1d) else (4,)
    return ()


def _ghost_layers(model: nn.Module, params: list[nn.Parameter], x: Tensor) -> tuple[list[nn.Module], int]:
    """The layers whose per-example gradient norms come from their input and output
    gradient alone ("ghost" layers: ``nn.Linear``, ``nn.Conv1d/2d`` (groups 1, zero
    padding), affine ``nn.GroupNorm``, ``nn.BatchNorm1d/2d`` with running statistics),
    each called once per forward, with all its own parameters trainable and used by
    no other module; and k, the number of outputs per example, from one forward of x[:1]."""
    trainable = {id(p) for p in params}
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    calls: dict[nn.Module, list[int]] = {}
    candidates = []
    for m in model.modules():
        own = list(m.parameters(recurse=False))
        if own and _ghost_input_ndims(m) and all(id(p) in trainable and uses[id(p)] == 1 for p in own):
            candidates.append(m)
    hooks = [m.register_forward_hook(lambda mod, inp, out: calls.setdefault(mod, []).append(inp[0].ndim)) for m in candidates]
    try:
        with torch.no_grad():
            k = model(x[:1]).numel()
    finally:
        for h in hooks:
            h.remove()
    return [m for m, ndims in calls.items() if len(ndims) == 1 and ndims[0] in _ghost_input_ndims(m)], k


def _conv_unfold(m: nn.Module, a: Tensor) -> Tensor:
    """The patches of a conv layer's input, (b, C_in·kernel, positions)."""
    if isinstance(m, nn.Conv1d):
        pad = 0 if m.padding == "valid" else m.padding[0]
        return F.unfold(a.unsqueeze(2), (1, m.kernel_size[0]), (1, m.dilation[0]), (0, pad), (1, m.stride[0]))
    return F.unfold(a, m.kernel_size, m.dilation, 0 if m.padding == "valid" else m.padding, m.stride)


def _ghost_context(m: nn.Module, a: Tensor, out: Tensor) -> tuple[str, Tensor]:
    """What layer m's per-example squared gradient norms need of its input a, computed
    once per block and shared by the k output gradients."""
    a = a.detach()
    if isinstance(m, nn.Linear):
        return "linear", a.pow(2).sum(1)
    if isinstance(m, _CONV):
        u = _conv_unfold(m, a)  # per-example weight gradient: G·Uᵀ, G the (C_out, L) output gradient
        positions, patch = u.shape[2], u.shape[1]
        # ‖GUᵀ‖² directly costs L·C_out·patch per example; as ⟨GᵀG, UᵀU⟩ (L×L Grams), L²·(C_out + patch).
        if positions * (m.out_channels + patch) < m.out_channels * patch:
            return "conv-gram", u.transpose(1, 2) @ u
        return "conv", u
    if isinstance(m, nn.GroupNorm):
        return "norm", F.group_norm(a, m.num_groups, eps=m.eps)
    shape = (1, -1) + (1,) * (a.ndim - 2)
    return "norm", (a - m.running_mean.view(shape)) / (m.running_var.view(shape) + m.eps).sqrt()


def _ghost_squared_norms(m: nn.Module, context: tuple[str, Tensor], g: Tensor) -> Tensor:
    """Per-example ‖∂(Σᵢ⟨gᵢ, zᵢ⟩)/∂θ_m‖² over layer m's parameters, (b,), from the
    gradient g of its output z — without forming per-example gradients where a Gram
    is cheaper (the "ghost norm" of Goodfellow 2015; for convolutions, Li et al. 2022)."""
    kind, c = context
    b = g.shape[0]
    bias = 0.0
    if kind == "linear":
        norms = g.pow(2).sum(1) * c
        return norms + g.pow(2).sum(1) if m.bias is not None else norms
    if kind in ("conv", "conv-gram"):
        gs = g.reshape(b, g.shape[1], -1)
        if m.bias is not None:
            bias = gs.sum(2).pow(2).sum(1)
        if kind == "conv":
            return (gs @ c.transpose(1, 2)).pow(2).sum((1, 2)) + bias
        return ((gs.transpose(1, 2) @ gs) * c).sum((1, 2)) + bias
    gs = g.reshape(b, g.shape[1], -1)
    return (gs * c.reshape(gs.shape)).sum(2).pow(2).sum(1) + gs.sum(2).pow(2).sum(1)


def _ghost_elements(model: nn.Module, layers: list[nn.Module], x: Tensor) -> int:
    """Numbers held per example by the ghost computation: each layer's output, its
    copy and gradient, and its context (see _ghost_context), from a forward of x[:1]."""
    sizes: list[int] = []

    def count(mod, inp, out):
        kind, c = _ghost_context(mod, inp[0], out)
        sizes.append(3 * out.numel() + c.numel())

    hooks = [m.register_forward_hook(count) for m in layers]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in hooks:
            h.remove()
    return sum(sizes)


def _ghost_trace(
    model: nn.Module, kind: str, names: list[str], params: list[nn.Parameter], x: Tensor, layers: list[nn.Module]
) -> Tensor:
    """Σᵢ tr(Λᵢ JᵢJᵢᵀ) over the examples in ``x`` (Jᵢ = ∂fᵢ/∂θ, Λᵢ the output Hessian).

    With Λᵢ = Σⱼ sᵢⱼsᵢⱼᵀ (mse: sᵢⱼ = eⱼ; cross-entropy: sᵢⱼ = √pᵢⱼ·(eⱼ − pᵢ)) the
    sum is Σⱼ Σᵢ ‖Jᵢᵀsᵢⱼ‖². For each j one batched backward pass of Σᵢ⟨fᵢ, sᵢⱼ⟩ to
    the ghost layers' outputs gives every example's gradient there (examples do not
    interact in eval mode), and the layers' per-example squared norms follow from
    their inputs (_ghost_squared_norms): k backward passes for the block, no
    per-example parameter gradients. The other parameters' share comes from
    per-example Jacobians (``torch.func.vmap`` of ``jacrev``).
    """
    saved: dict[nn.Module, tuple[Tensor, Tensor]] = {}

    def keep(mod, inp, out):
        # Downstream gets a copy, so an in-place op after the layer (ReLU(inplace=True),
        # out += identity) cannot change the tensor whose gradient we ask for.
        saved[mod] = (inp[0], out)
        return out.clone()

    hooks = [m.register_forward_hook(keep) for m in layers]
    try:
        with torch.set_grad_enabled(bool(layers)):
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    flat = out.reshape(out.shape[0], -1)
    total = torch.zeros((), dtype=torch.float64, device=out.device)
    if layers:
        outputs = [saved[m][1] for m in layers]
        contexts = [_ghost_context(m, *saved[m]) for m in layers]
        saved.clear()
        probs = flat.detach().softmax(1)
        k = flat.shape[1]
        for j in range(k):
            if kind == "mse":
                s = torch.zeros_like(probs)
                s[:, j] = 1.0
            else:
                s = -probs
                s[:, j] += 1.0
                s = s * probs[:, j : j + 1].sqrt()
            grads = torch.autograd.grad((flat * s).sum(), outputs, retain_graph=j < k - 1, allow_unused=True)
            for m, context, g in zip(layers, contexts, grads, strict=True):
                if g is not None:
                    total += _ghost_squared_norms(m, context, g).sum().double()
    in_layers = {id(p) for m in layers for p in m.parameters(recurse=False)}
    rest = [(name, p) for name, p in zip(names, params, strict=True) if id(p) not in in_layers]
    if rest:
        grams = _rest_grams(model, [n for n, _ in rest], [p for _, p in rest], x)
        total += (_output_hessians(kind, flat.detach()) * grams.detach()).sum().double()  # Σᵢ tr(ΛᵢKᵢ): both symmetric
    return total


def _rest_grams(model: nn.Module, names: list[str], params: list[nn.Parameter], x: Tensor) -> Tensor:
    """Σ over ``params`` of their share of JᵢJᵢᵀ, from per-example Jacobians."""

    def output(ps: tuple[Tensor, ...], xi: Tensor) -> Tensor:
        return torch.func.functional_call(model, dict(zip(names, ps, strict=True)), (xi.unsqueeze(0),)).reshape(-1)

    # Tied parameters (one tensor under several names): torch.func.functional_call
    # left such a model differentiating stale tensors after a few calls (torch
    # 2.14: the tied layer's share of tr G vanished). They take the loop.
    tied = len(list(model.named_parameters(remove_duplicate=False))) != len(list(model.named_parameters()))
    if not tied:
        try:
            jacobians = torch.func.vmap(torch.func.jacrev(output), in_dims=(None, 0))(tuple(params), x)
        except (RuntimeError, NotImplementedError):
            pass  # a module torch.func cannot batch (in-place ops on captured tensors, custom autograd functions)
        else:
            js = [jac.reshape(jac.shape[0], jac.shape[1], -1) for jac in jacobians]
            return sum(j @ j.transpose(1, 2) for j in js)
    return torch.stack([_jacobian_gram_looped(model, params, xi) for xi in x])


def _jacobian_gram_looped(model: nn.Module, params: list[nn.Parameter], xi: Tensor) -> Tensor:
    out = model(xi.unsqueeze(0)).reshape(-1)
    rows = []
    for c in range(out.numel()):
        grads = torch.autograd.grad(out[c], params, retain_graph=c < out.numel() - 1, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params, strict=True)]))
    j = torch.stack(rows)
    return j @ j.T


def exact_trace_gauss_newton(
    model,
    loss_fn,
    inputs,
    targets,
    chunk_size: int = 1024,
    *,
    max_jacobian_elements: int = 2**26,
    on_chunk: Callable[[int, int], None] | None = None,
) -> TraceEstimate:
    """tr G exactly: (1/n)·Σᵢ tr(Λᵢ JᵢJᵢᵀ), G the Gauss–Newton matrix of the mean loss.

    Jᵢ (k × dim) is the Jacobian of example i's k outputs and Λᵢ the Hessian of
    the loss in the outputs: diag(pᵢ) − pᵢpᵢᵀ for cross-entropy (label-smoothed
    or not) and I for ``mse_loss`` (½‖f − y‖²), from ``loss_fn.kind``. Linear,
    convolution and normalization layers (see _ghost_layers) take k batched
    backward passes per block of examples and per-example gradient norms read
    off their inputs (_ghost_trace): about k gradients' work over the examples
    (measured by benchmarks/bench_trace_gn.py). Other parameters take
    per-example reverse-mode Jacobians (``torch.func.vmap`` of ``jacrev``; one
    backward per example and output where a model cannot be vmapped). Memory:
    at most ``max_jacobian_elements`` numbers per block (Jacobians, layer
    outputs and their gradients; activations of the forward itself are not
    counted), and at most ``chunk_size`` examples. No randomness: ``stderr`` is
    0. ``on_chunk(done, n)`` is called after each block. Model in eval mode, as
    for the HVPs.
    """
    kind = _loss_kind(loss_fn)
    names, params = trainable_parameters(model)
    refuse_dropout(model)
    n = check_data(inputs, targets, chunk_size)
    check_int("max_jacobian_elements", max_jacobian_elements, 1)
    dtype, device = params[0].dtype, params[0].device
    dim = sum(p.numel() for p in params)
    total = torch.zeros((), dtype=torch.float64, device=device)
    with evaluation_mode(model), no_autocast(device):
        first = to_model(inputs[:1], dtype, device)
        layers, k = _ghost_layers(model, params, first)
        vmapped = dim - sum(p.numel() for m in layers for p in m.parameters(recurse=False))
        per_example = (k * vmapped if vmapped else 0) + (_ghost_elements(model, layers, first) if layers else 0)
        block = max(1, min(chunk_size, max_jacobian_elements // max(per_example, 1)))
        for start in range(0, n, block):
            x = to_model(inputs[start : min(start + block, n)], dtype, device)
            with torch.enable_grad():  # also under a caller's no_grad
                total += _ghost_trace(model, kind, names, params, x, layers)
            if on_chunk is not None:
                on_chunk(min(start + block, n), n)
    return TraceEstimate(float(total) / n, 0.0, 0, "gauss_newton_exact")


# ---------------------------------------------------------------------------
# The residual ∇²L − G, and tr∇²L as tr G + tr(∇²L − G).
# ---------------------------------------------------------------------------


class _ResidualLoss:
    """φ(f) = mean over the chunk of ⟨fᵢ, rᵢ⟩ with rᵢ = ∂ℓᵢ/∂fᵢ frozen (passed as the targets)."""

    def __call__(self, out: Tensor, weights: Tensor) -> Tensor:
        return (out.reshape(out.shape[0], -1) * weights.reshape(weights.shape[0], -1)).sum(1).mean()

    def __repr__(self) -> str:
        return "residual term Σᵢ⟨∂ℓᵢ/∂fᵢ, fᵢ(θ)⟩"


def residual_matvec(model, loss_fn, inputs, targets, chunk_size: int = 1024) -> tuple[HessianOperator, int]:
    """The Hessian's non-Gauss–Newton part ∇²L − G as a matrix-free operator: ``(matvec, dim)``.

    ∇²L = G + (1/n)·Σᵢ Σ_c (∂ℓᵢ/∂f_c)·∇²f_c(xᵢ), and the second term is the
    Hessian of φ(θ) = (1/n)·Σᵢ⟨rᵢ, fᵢ(θ)⟩ with rᵢ = ∂ℓᵢ/∂fᵢ held at the current θ.
    Its products cost what a Hessian's do. It vanishes where the residuals do
    (a loss fit exactly) and its diagonal block of each layer vanishes where the
    network is linear in that layer (ReLU networks without GroupNorm): then its
    trace is exactly 0.
    """
    _, params = trainable_parameters(model)
    n = check_data(inputs, targets, chunk_size)
    dtype, device = params[0].dtype, params[0].device
    weights = []
    with evaluation_mode(model), no_autocast(device), torch.enable_grad():
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            with torch.no_grad():
                out = model(to_model(inputs[start:stop], dtype, device))
            out.requires_grad_(True)
            # loss_fn is a batch mean: its gradient is ∂ℓᵢ/∂fᵢ / b.
            (grad,) = torch.autograd.grad(loss_fn(out, to_model(targets[start:stop], dtype, device)), out)
            weights.append((grad * (stop - start)).detach())
    return hessian_matvec(model, _ResidualLoss(), inputs, torch.cat(weights), chunk_size)


def trace_hessian(
    model,
    loss_fn,
    inputs,
    targets,
    num_matvecs: int,
    generator: torch.Generator | None = None,
    chunk_size: int = 1024,
    *,
    method: str = "auto",
    residual_method: str = "xtrace",
) -> SplitTraceEstimate:
    """tr∇²L of a model's mean loss, split as tr G + tr(∇²L − G).

    tr G comes exactly from per-example Jacobians (``exact_trace_gauss_newton``).
    ``method="split"``: only the residual ∇²L − G (``residual_matvec``) is
    estimated, by ``estimate_trace`` with ``residual_method`` (XTrace by default:
    the residual of a ReLU network has zero diagonal blocks and a few large
    eigenvalues of both signs, which XTrace deflates) and ``num_matvecs``
    products; the error is that of the residual alone. ``method="auto"``
    (default): where every parameter tensor provably enters the model linearly
    (``is_piecewise_linear``: ReLU networks of Linear/Conv/eval-mode BatchNorm
    layers) the residual's trace is exactly 0 and the result is tr G with no
    product and stderr 0 (method "auto:exact"); otherwise ``choose_trace`` spends
    a pilot on both ∇²L and the residual and probes the better one. See benchmarks/bench_trace.py for both. Memory: XTrace
    keeps about 2·``num_matvecs`` vectors of the parameters' size.
    Needs ``loss_fn.kind`` (cross-entropy or mse); for other losses use
    ``estimate_trace(hessian_matvec(...))``.
    """
    if method not in ("auto", "split"):
        raise LnsgdError(f"method must be 'auto' or 'split'; got {method!r}")
    _loss_kind(
        loss_fn,
        "trace_hessian has no method for other losses (method is 'auto' or 'split'): estimate tr∇²L with "
        "estimate_trace(*hessian_matvec(model, loss_fn, inputs, targets), num_matvecs, method='xtrace')",
    )
    gn = exact_trace_gauss_newton(model, loss_fn, inputs, targets, chunk_size)
    if method == "auto" and is_piecewise_linear(model):
        return exact_split(gn.value)
    op, dim = residual_matvec(model, loss_fn, inputs, targets, chunk_size)
    if method == "auto":
        hessian, _ = hessian_matvec(model, loss_fn, inputs, targets, chunk_size)
        return choose_trace(hessian, op, dim, gn.value, num_matvecs, generator)
    return split_trace(op, dim, gn.value, num_matvecs, generator, method=residual_method)
