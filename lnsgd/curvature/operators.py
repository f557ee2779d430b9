"""Operators: the matrix-free Hessian of a model's mean loss, and what every estimator needs.

``hessian_matvec`` builds v ↦ ∇²L(θ)·v of the *mean* loss over a fixed set of
examples (``HessianOperator``); ``dense_hessian`` is the dim × dim matrix for tiny
models. The estimators (``lnsgd.curvature.trace``, ``.lanczos``, ``.regularizer``)
take any symmetric operator — a callable on flat 1-D tensors of length ``dim`` or
a dense symmetric 2-D tensor — wrapped in ``Operator``, which fixes the dtype and
device of the probes and checks every product's shape. The checks, probe
generators and mean-with-stderr here are shared by all of them.

Models are measured as the loop would evaluate them: through the eager module of
a ``torch.compile`` wrapper, in eval mode (``evaluation_mode``),
without autocast, and never with active dropout (``refuse_dropout``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from lnsgd.errors import LnsgdError

Matvec = Callable[[Tensor], Tensor]


# ---------------------------------------------------------------------------
# Small helpers: validation, randomness, operators.
# ---------------------------------------------------------------------------


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` if it is an int (not a bool) ≥ ``minimum``; else an ``LnsgdError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise LnsgdError(f"{name} must be an integer ≥ {minimum}; got {value!r}")
    return value


def resolve_generator(generator: torch.Generator | None) -> torch.Generator:
    """The caller's ``torch.Generator``, or a CPU one seeded with 0 for ``None``."""
    # A fixed default keeps results reproducible; pass your own for fresh draws.
    if generator is None:
        return torch.Generator().manual_seed(0)
    if not isinstance(generator, torch.Generator):
        raise LnsgdError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
    return generator


def rademacher(shape: tuple[int, ...], gen: torch.Generator, dtype, device) -> Tensor:
    """Independent ±1 entries drawn on ``gen``'s device, returned in ``dtype`` on ``device``."""
    signs = torch.randint(0, 2, shape, generator=gen, device=gen.device)
    return (2 * signs - 1).to(device=device, dtype=dtype)


def gaussian(shape: tuple[int, ...], gen: torch.Generator, dtype, device) -> Tensor:
    """Independent N(0, 1) entries drawn on ``gen``'s device, returned in ``dtype`` on ``device``."""
    return torch.randn(shape, generator=gen, device=gen.device).to(device=device, dtype=dtype)


def free_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` (CUDA: the driver's figure; CPU: MemAvailable), or None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def mean_and_stderr(samples: Tensor) -> tuple[float, float]:
    """The mean of ``samples`` and its standard error (sample std / √count), in float64."""
    samples = samples.double()
    return float(samples.mean()), float(samples.std() / math.sqrt(samples.numel()))


class Operator:
    """A user matvec (callable or dense tensor) with a known dtype/device and checks.

    Probe dtype and device: the ``dtype``/``device`` given, else the matvec's
    ``.dtype``/``.device`` attribute (``HessianOperator`` and dense tensors have
    them), else inferred from one product with a zero vector: float32 on the CPU,
    or float64 where the callable refuses float32 (``lambda v: A @ v`` over a
    float64 ``A``). Products are returned in that dtype/device.
    """

    def __init__(self, matvec, dim: int, dtype=None, device=None):
        self.dim = check_int("dim", dim, 1)
        if isinstance(matvec, Tensor):
            if matvec.shape != (dim, dim):
                raise LnsgdError(f"a dense operator must have shape (dim, dim) = ({dim}, {dim}); got {tuple(matvec.shape)}")
            matrix = matvec
            matvec = lambda v: matrix @ v  # noqa: E731
            dtype = dtype or matrix.dtype
            device = device or matrix.device
        elif not callable(matvec):
            raise LnsgdError(f"matvec must be a callable or a square tensor; got {type(matvec).__name__}")
        self.fn = matvec
        self.device = torch.device(device or getattr(matvec, "device", None) or "cpu")
        self.dtype = dtype or getattr(matvec, "dtype", None) or self._infer_dtype()
        if not self.dtype.is_floating_point:
            raise LnsgdError(f"dtype must be a floating-point dtype; got {self.dtype}")

    def _infer_dtype(self) -> torch.dtype:
        """The first of float32, float64 that the callable accepts, found with one product of a zero vector."""
        failure = None
        for dtype in (torch.float32, torch.float64):
            try:
                self.fn(torch.zeros(self.dim, dtype=dtype, device=self.device))
            except RuntimeError as e:  # torch's "same dtype" / "expected scalar type" errors
                failure = failure or e
                continue
            return dtype
        first = str(failure).strip().splitlines()[0][:160] if str(failure).strip() else type(failure).__name__
        raise LnsgdError(
            f"matvec fails on float32 and float64 vectors on {self.device} ({first}); pass the dtype and device "
            "its tensors use, e.g. dtype=torch.float64, device='cuda'"
        )

    def __call__(self, v: Tensor) -> Tensor:
        out = self.fn(v)
        if not isinstance(out, Tensor) or out.shape != (self.dim,):
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise LnsgdError(f"matvec must return a 1-D tensor of length dim={self.dim}; got {shape}")
        return out.to(dtype=self.dtype, device=self.device)

    def columns(self, X: Tensor) -> Tensor:
        """Apply the operator to each column of X (one matvec per column)."""
        return torch.stack([self(X[:, j]) for j in range(X.shape[1])], dim=1)


# ---------------------------------------------------------------------------
# The Hessian operator of a model's mean loss.
# ---------------------------------------------------------------------------

_DROPOUT_TYPES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


def trainable_parameters(model: nn.Module) -> tuple[list[str], list[nn.Parameter]]:
    """Names and tensors of the parameters with ``requires_grad``, in ``named_parameters()`` order."""
    if not isinstance(model, nn.Module):
        raise LnsgdError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise LnsgdError("model has no parameters with requires_grad=True; nothing to differentiate")
    return [n for n, _ in named], [p for _, p in named]


def refuse_dropout(model: nn.Module) -> None:
    """Raise ``LnsgdError`` naming the first dropout module with p > 0."""
    # Eval mode switches dropout off, but a model that carries dropout was trained
    # on a different (random) function; measuring its deterministic twin silently
    # would mislead, and a module that calls F.dropout(training=True) would give
    # nondeterministic HVPs, which break every Krylov method below.
    for name, module in model.named_modules():
        if isinstance(module, _DROPOUT_TYPES) and module.p > 0:
            raise LnsgdError(
                f"model has {type(module).__name__}(p={module.p}) at '{name or '<root>'}': dropout "
                "makes nondeterministic HVPs; set its p=0 (or remove it) before measuring curvature"
            )


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Put every module in eval mode and run ``torch.compile``d code eagerly, then restore both.

    Compiled graphs (aot_autograd) do not support double backward, which every HVP
    needs; ``torch.compiler.set_stance("force_eager")`` (torch ≥ 2.6) runs a compiled
    module's own eager function, with the same parameters.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    set_stance = getattr(torch.compiler, "set_stance", None)
    stance = set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()
    try:
        with stance:
            yield
    finally:
        for module, training in modes:
            module.training = training


def check_data(inputs: Tensor, targets: Tensor, chunk_size: int) -> int:
    """The number of examples n, after checking inputs/targets are tensors of n ≥ 1 rows and chunk_size ≥ 1."""
    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
        raise LnsgdError("inputs and targets must be tensors")
    n = inputs.shape[0] if inputs.ndim else 0
    if n == 0:
        raise LnsgdError("inputs must hold at least one example (first dimension ≥ 1)")
    if targets.shape[0:1] != (n,):
        raise LnsgdError(f"targets must have one entry per input: inputs have {n}, targets have shape {tuple(targets.shape)}")
    check_int("chunk_size", chunk_size, 1)
    return n


def to_model(t: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``t`` on the model's device; floating tensors also in the parameters' dtype."""
    # Floating inputs follow the parameters' dtype (float64 models get float64
    # data); integer inputs and labels keep theirs.
    if t.is_floating_point():
        return t.to(device=device, dtype=dtype, non_blocking=True)
    return t.to(device=device, non_blocking=True)


def no_autocast(device: torch.device):
    """A context with autocast off on ``device`` (a no-op where the device type has none)."""
    # Curvature is measured in the parameters' own precision, never bf16/fp16.
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()


def flatten_params(model: nn.Module) -> Tensor:
    """The trainable parameters, detached and concatenated in ``model.parameters()`` order."""
    _, params = trainable_parameters(model)
    return torch.cat([p.detach().reshape(-1) for p in params])


class HessianOperator:
    """v ↦ ∇²L(θ)·v for L the mean of ``loss_fn`` over all ``inputs``.

    Built by ``hessian_matvec``. Each call puts the model in eval mode (BatchNorm
    uses its running statistics), disables autocast, and restores every module's
    train/eval flag afterwards. The input vector may have any dtype/device; the
    product is computed in the parameters' dtype and returned in the input's.
    ``num_matvecs`` counts calls.

    The gradient's graph of each chunk can be built once and kept (``cache_graph``):
    each product is then one backward pass through it, about half the cost of
    rebuilding it. Default (``cache_graph=None``): kept when all examples fit in one
    chunk (its memory is what a single product needs at its peak anyway), and with
    several chunks when their graphs fit in ``cache_bytes``: the first product
    measures one chunk's saved tensors (``torch.autograd.graph.saved_tensors_hooks``,
    Σ numel·element_size, plus its gradients) and extrapolates to all chunks
    (``graph_bytes``); ``cache_bytes`` defaults to min(2 GiB, half the device's free
    memory). ``cache_graph`` then says what was decided. The cache is rebuilt if any
    parameter or buffer is modified in place (tracked by version counters), and
    ``release()`` frees it.
    """

    def __init__(
        self, model, loss_fn, inputs, targets, chunk_size: int = 1024, cache_graph: bool | None = None, cache_bytes: int | None = None
    ):
        model = model
        _, self.params = trainable_parameters(model)
        refuse_dropout(model)
        self.n = check_data(inputs, targets, chunk_size)
        if not callable(loss_fn):
            raise LnsgdError(f"loss_fn must be callable; got {type(loss_fn).__name__}")
        self.model, self.loss_fn = model, loss_fn
        self.inputs, self.targets, self.chunk_size = inputs, targets, chunk_size
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.dim = sum(self.numels)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.num_matvecs = 0
        # None: decided on the first product (see the class docstring).
        self.cache_graph = True if cache_graph is None and self.n <= chunk_size else cache_graph
        self.cache_bytes = None if cache_bytes is None else check_int("cache_bytes", cache_bytes, 0)
        self.graph_bytes: int | None = None  # the measured estimate of all chunks' graphs, when measured
        self._cache: tuple[list[int], list[list[Tensor | None]]] | None = None

    def release(self) -> None:
        """Free the cached gradient graph (if any)."""
        self._cache = None

    def _chunk_grads(self, start: int, stop: int) -> list[Tensor | None]:
        """∇ of this chunk's share of the mean loss, with its graph (for the second backward)."""
        x = to_model(self.inputs[start:stop], self.dtype, self.device)
        y = to_model(self.targets[start:stop], self.dtype, self.device)
        # Weight each chunk's mean by its share so the sum is the full-batch mean.
        loss = self.loss_fn(self.model(x), y) * ((stop - start) / self.n)
        return list(torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True))

    def _chunks(self) -> list[tuple[int, int]]:
        return [(start, min(start + self.chunk_size, self.n)) for start in range(0, self.n, self.chunk_size)]

    def _measured_chunk_grads(self, start: int, stop: int) -> tuple[list[Tensor | None], int]:
        """A chunk's gradients with their graph, and the bytes that graph keeps (its saved tensors and the gradients)."""
        saved = 0

        def pack(t: Tensor) -> Tensor:
            nonlocal saved
            saved += t.numel() * t.element_size()  # tensors shared between nodes are counted each time: an upper bound
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            grads = self._chunk_grads(start, stop)
        saved += sum(g.numel() * g.element_size() for g in grads if g is not None)
        return grads, saved

    def _cache_bound(self) -> int:
        if self.cache_bytes is not None:
            return self.cache_bytes
        free = free_memory(self.device)
        return 2**31 if free is None else min(2**31, free // 2)

    def _hvp_chunk(self, grads: list[Tensor | None], vs: list[Tensor], out: list[Tensor], retain: bool) -> None:
        # Double backward: ∇(∇L·v) = ∇²L·v. Works for any norm layer, unlike some
        # forward-mode rules, at ~4 gradients per product (~2 with a cached graph).
        terms = [(g * u).sum() for g, u in zip(grads, vs, strict=True) if g is not None]
        if not terms:
            return
        dot = sum(terms[1:], terms[0])
        if not dot.requires_grad:
            return  # the loss is (at most) linear in θ on this chunk
        hv = torch.autograd.grad(dot, self.params, allow_unused=True, retain_graph=retain)
        for acc, h in zip(out, hv, strict=True):
            if h is not None:
                acc.add_(h.detach())

    def __call__(self, v: Tensor) -> Tensor:
        if not isinstance(v, Tensor) or v.shape != (self.dim,):
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise LnsgdError(f"the Hessian operator needs a 1-D tensor of length {self.dim}; got {shape}")
        vs = v.to(device=self.device, dtype=self.dtype).split(self.numels)
        vs = [piece.view(shape) for piece, shape in zip(vs, self.shapes, strict=True)]
        out = [torch.zeros_like(p) for p in self.params]
        with evaluation_mode(self.model), torch.enable_grad(), no_autocast(self.device):
            chunks = self._chunks()
            if self.cache_graph is None:
                # Decide once: measure the first chunk's graph, extrapolate to all chunks.
                first, nbytes = self._measured_chunk_grads(*chunks[0])
                self.graph_bytes = nbytes * len(chunks)
                self.cache_graph = self.graph_bytes <= self._cache_bound()
                if not self.cache_graph:
                    self._hvp_chunk(first, vs, out, retain=False)
                    chunks = chunks[1:]  # the first chunk's share is done
                else:
                    versions = [t._version for t in (*self.params, *self.model.buffers())]
                    self._cache = (versions, [first] + [self._chunk_grads(*c) for c in chunks[1:]])
            if self.cache_graph:
                # In-place updates (optimizer steps, BatchNorm statistics) bump versions.
                versions = [t._version for t in (*self.params, *self.model.buffers())]
                if self._cache is None or self._cache[0] != versions:
                    self._cache = (versions, [self._chunk_grads(*c) for c in chunks])
                for grads in self._cache[1]:
                    self._hvp_chunk(grads, vs, out, retain=True)
            else:
                for start, stop in chunks:
                    self._hvp_chunk(self._chunk_grads(start, stop), vs, out, retain=False)
        self.num_matvecs += 1
        return torch.cat([o.reshape(-1) for o in out]).to(device=v.device, dtype=v.dtype)


def hessian_matvec(
    model, loss_fn, inputs, targets, chunk_size: int = 1024, *, cache_graph: bool | None = None, cache_bytes: int | None = None
) -> tuple[HessianOperator, int]:
    """Matrix-free Hessian of the mean loss over ``inputs``: returns ``(matvec, dim)``.

    ``loss_fn(outputs, targets)`` must return the *mean* over its batch. The data
    are processed in chunks of ``chunk_size`` examples (memory is bounded by one
    chunk's double-backward graph), and each chunk's loss is weighted by its
    length / n, so the product is that of the full-batch mean loss. Parameters
    with ``requires_grad`` are flattened in ``model.parameters()`` order.
    Models containing dropout with p > 0 are refused (``LnsgdError``).
    ``cache_graph`` keeps the chunks' gradient graphs between products (default:
    when they fit in ``cache_bytes``, by default min(2 GiB, half the free memory));
    see ``HessianOperator``.
    """
    op = HessianOperator(model, loss_fn, inputs, targets, chunk_size, cache_graph, cache_bytes)
    return op, op.dim


def dense_hessian(model, loss_fn, inputs, targets) -> Tensor:
    """The exact dense Hessian (dim × dim) of the mean loss, via ``torch.func``.

    Independent of ``hessian_matvec`` (``functional_call`` + vmapped VJPs on the
    whole batch at once, no chunking); tests check it against
    ``torch.autograd.functional.hessian``.
    Only for tiny models: memory and time grow as dim².
    """
    model = model
    names, params = trainable_parameters(model)
    refuse_dropout(model)
    check_data(inputs, targets, 1)
    dtype, device = params[0].dtype, params[0].device
    x, y = to_model(inputs, dtype, device), to_model(targets, dtype, device)
    shapes, numels = [p.shape for p in params], [p.numel() for p in params]

    def loss_of(flat: Tensor) -> Tensor:
        pieces = [t.view(s) for t, s in zip(flat.split(numels), shapes, strict=True)]
        out = torch.func.functional_call(model, dict(zip(names, pieces, strict=True)), (x,))
        return loss_fn(out, y)

    with evaluation_mode(model), no_autocast(device):
        # Reverse-over-reverse (jacrev of grad, vmapped over the identity); unlike
        # torch.func.hessian's forward-over-reverse it needs no forward-mode
        # decompositions, whose first load costs seconds.
        return torch.func.jacrev(torch.func.grad(loss_of))(flatten_params(model))
