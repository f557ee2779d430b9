"""Is every parameter tensor of a model entering its output (piecewise) linearly?

Then tr∇²L = tr G exactly: ∇²L − G = (1/n)·Σᵢ Σ_c (∂ℓᵢ/∂f_c)·∇²f_c(xᵢ), and the diagonal
block of ∇²f_c for a parameter tensor P is 0 wherever f is affine in P with the other
parameters held fixed — which holds almost everywhere (off the kinks of ReLU and max,
where autograd's derivatives are those of one linear piece) for a composition of
piecewise-linear maps in which no parameter multiplies itself. A ReLU network without
GroupNorm/LayerNorm is such a model: each layer's weights enter linearly, the
network is multilinear in its layers.

``is_piecewise_linear`` decides it from the model's code, never from numbers: a
``torch.fx.symbolic_trace`` of the forward, and a whitelist of operations. Each node of
the graph carries, per parameter tensor, the degree with which it enters (polynomial
degree of the local affine pieces: 1 = linear). Products add the degrees of their
factors, sums and piecewise-linear maps keep the largest; an operation off the
whitelist, a parameter used twice, a model fx cannot trace, or a degree above 1 at the
output, and the answer is False. A False only means "probe the residual as before".
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from lnsgd.curvature.operators import evaluation_mode

# Degrees: {id(parameter): degree}. A tensor that depends on no parameter has {}.
Degrees = dict[int, int]


def _max(*ds: Degrees) -> Degrees:
    out: Degrees = {}
    for d in ds:
        for k, v in d.items():
            out[k] = max(out.get(k, 0), v)
    return out


def _sum(*ds: Degrees) -> Degrees:
    out: Degrees = {}
    for d in ds:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


# Operations linear in each tensor argument taken alone and jointly affine in a sum
# (a + b, cat), or piecewise linear in their one tensor input (relu, max pooling,
# reshapes): the result's degree per parameter is the largest of its inputs'.
_KEEP_FUNCTIONS = {
    operator.add, operator.sub, operator.iadd, operator.isub, operator.neg, operator.pos, operator.getitem,
    torch.add, torch.sub, torch.neg, torch.relu, F.relu, torch.relu_, F.relu_, F.leaky_relu, F.relu6, F.hardtanh,
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.cat, torch.stack, torch.squeeze,
    torch.unsqueeze, torch.sum, torch.mean, F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.pad,
}  # fmt: skip
# Products: linear in each factor, so the degrees add (W·x with x independent of W is linear in W).
_PRODUCT_FUNCTIONS = {operator.mul, operator.imul, operator.matmul, torch.mul, torch.matmul, torch.mm, torch.bmm, F.linear,
                      F.conv1d, F.conv2d}  # fmt: skip
_KEEP_METHODS = {
    "view", "reshape", "flatten", "permute", "transpose", "contiguous", "relu", "relu_", "squeeze", "unsqueeze",
    "sum", "mean", "add", "add_", "sub", "sub_", "neg", "expand", "expand_as", "view_as", "reshape_as", "t", "clone",
    "chunk", "split", "narrow",
}  # fmt: skip
_PRODUCT_METHODS = {"mul", "mul_", "matmul", "mm", "bmm"}
_SHAPE_METHODS = {"size", "dim", "numel"}  # return ints: no parameter in them
# Parameter-free modules that are piecewise linear in their input (the affine ones,
# Linear, Conv and eval-mode BatchNorm, are in _module_degrees).
_PIECEWISE_MODULES = (
    nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.Hardtanh, nn.Identity, nn.Flatten, nn.Unflatten, nn.MaxPool1d, nn.MaxPool2d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d,
)  # fmt: skip


def _module_degrees(module: nn.Module, inp: Degrees) -> Degrees | None:
    """The degrees of a leaf module's output from its input's, or None if it is off the whitelist."""
    own = {id(p): 1 for p in module.parameters(recurse=False)}
    if type(module) in (nn.Linear, nn.Conv1d, nn.Conv2d):
        return _sum(inp, own)  # W·x + b: the weight multiplies the input
    if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d):
        # In eval mode with running statistics: γ·(x − μ)/σ + β, μ and σ buffers. Without
        # running statistics eval mode normalizes by the batch's: nonlinear in x.
        if module.running_mean is None or module.running_var is None:
            return None
        return _sum(inp, own)
    if type(module) is nn.Dropout:
        return inp if module.p == 0 and not own else None
    if type(module) in _PIECEWISE_MODULES and not own:
        return inp
    return None


def _trace(model: nn.Module):
    """The fx graph module of ``model``, or None if fx cannot trace it (a ``torch.compile``d
    module among them: it is then measured by probes, as before)."""
    try:
        with evaluation_mode(model):  # the forward the HVPs differentiate (a branch on self.training)
            return torch.fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 — data-dependent control flow, unsupported Python: not provable
        return None


def is_piecewise_linear(model: nn.Module) -> bool:
    """True if every trainable parameter tensor enters the output linearly (piecewise), by
    the whitelist of this module's docstring; then tr(∇²L − G) = 0 exactly. False otherwise,
    including whenever it cannot be shown."""
    graph_module = _trace(model)
    if graph_module is None:
        return False
    trainable = {id(p) for p in graph_module.parameters() if p.requires_grad}
    modules = dict(graph_module.named_modules())
    uses: dict[int, int] = {}
    degrees: dict[torch.fx.Node, Degrees] = {}

    def of(arg) -> list[Degrees]:
        """The degrees of every graph node inside an argument (nested tuples/lists/dicts)."""
        found: list[Degrees] = []
        torch.fx.node.map_arg(arg, lambda n: found.append(degrees[n]))
        return found

    def use(params) -> bool:
        for p in params:
            uses[id(p)] = uses.get(id(p), 0) + 1
            if uses[id(p)] > 1:
                return False  # tied or reused: conservatively not shown linear
        return True

    for node in graph_module.graph.nodes:
        ins = of((node.args, node.kwargs))
        if node.op == "placeholder":
            out: Degrees | None = {}
        elif node.op == "get_attr":
            target = graph_module
            for part in node.target.split("."):
                target = getattr(target, part)
            if isinstance(target, nn.Parameter):
                if not use([target]):
                    return False
                out = {id(target): 1}
            else:
                out = {}  # a buffer or constant tensor
        elif node.op == "call_module":
            module = modules[node.target]
            if not use(module.parameters(recurse=False)) or len(ins) != 1:
                return False
            out = _module_degrees(module, ins[0])
        elif node.op == "call_function":
            if node.target in _KEEP_FUNCTIONS:
                out = _max(*ins)
            elif node.target in _PRODUCT_FUNCTIONS:
                out = _sum(*ins)
            elif node.target in (operator.truediv, torch.div) and not any(of(node.args[1:])):
                out = _max(*ins)  # division by a constant
            elif node.target is getattr and node.args[1] in ("shape", "ndim", "dtype", "device"):
                out = {}
            else:
                return False
        elif node.op == "call_method":
            if node.target in _KEEP_METHODS:
                out = _max(*ins)
            elif node.target in _PRODUCT_METHODS:
                out = _sum(*ins)
            elif node.target in _SHAPE_METHODS:
                out = {}
            else:
                return False
        elif node.op == "output":
            return all(v <= 1 for k, v in _max(*ins).items() if k in trainable)
        else:
            return False
        if out is None:
            return False
        degrees[node] = out
    return False
