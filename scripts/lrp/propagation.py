"""The LRP engine: one traced forward pass, then relevance propagated backwards layer by layer with the rules
of a composite -- without autograd hooks, without touching the model.

    explainer = LRP(model)                      # model in eval mode, a chain of modules
    trace = explainer.trace(x)                  # one forward pass, batched
    a2b1 = trace.relevance("a2b1")              # target: predicted class (default)
    a1b0 = trace.relevance("a1b0", target=1)    # reuses the denominators cached by the trace
    diff = trace.relevance("a2b1", target="difference")  # logit[1] - logit[0]

Relevance starts at the target logit, so ``relevance.sum() ~ logit``; biases absorb or add relevance, so the
conservation ratio (sum of the input map / starting relevance) is returned with every map and is exactly 1 only
for bias-free networks or bias-free rules (``<preset>_nobias``; alpha-beta and z+ where no denominator is 0), up
to the stabiliser.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from scripts.lrp.composites import Composite, get_composite
from scripts.lrp.layers import LinearOp, linear_op
from scripts.lrp.rules import stabilize

__all__ = ["LRP", "Explanation", "Trace", "UnsupportedModuleError"]

_LINEAR = (nn.Linear, nn.modules.conv._ConvNd)
_BATCHNORM = nn.modules.batchnorm._BatchNorm
_PASS = (nn.ReLU, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
_AVGPOOL = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_MAXPOOL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_POOL_STABILIZER = 1e-6


_AVGPOOL_BACKWARD = {nn.AvgPool2d: torch.ops.aten.avg_pool2d_backward, nn.AvgPool3d: torch.ops.aten.avg_pool3d_backward}


def _tuple(value, x):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * (x.ndim - 2)


class UnsupportedModuleError(TypeError):
    """The network holds a module (or a functional operation) that no LRP rule here covers."""


@dataclass
class Explanation:
    """Relevance maps for a batch: ``relevance`` has the input's shape; ``target`` the class per sample (-1 for
    the logit difference); ``start`` the relevance put on the output (the target logit or logit difference);
    ``conservation`` = relevance.sum per sample / start."""

    relevance: torch.Tensor
    logits: torch.Tensor
    target: torch.Tensor
    start: torch.Tensor
    conservation: torch.Tensor
    composite: str


@dataclass
class _Step:
    kind: str  # "linear", "pass", "flatten", "avgpool", "maxpool"
    name: str
    module: nn.Module
    x: torch.Tensor | None = None
    out: torch.Tensor | None = None  # kept only where it is needed and not changed in place later
    input_shape: tuple | None = None
    op: LinearOp | None = None


def _ref(tensor):
    return weakref.ref(tensor) if isinstance(tensor, torch.Tensor) else (lambda: None)


def _unwrap(model: nn.Module) -> nn.Module:
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


class LRP:
    """Layer-wise relevance propagation for chains of Conv/Linear(+BatchNorm), ReLU, Dropout, average/max pooling
    and Flatten modules. Anything else raises :class:`UnsupportedModuleError` naming the module."""

    def __init__(self, model: nn.Module):
        self.model = _unwrap(model)

    def trace(self, x: torch.Tensor, cache: bool = True) -> Trace:
        """Run one forward pass and keep what the backward rules need. ``cache`` keeps rule denominators for
        reuse by further composites/targets on this trace (more memory, less time)."""
        return Trace(self.model, x, cache)

    def __call__(self, x: torch.Tensor, composite="a2b1", target="pred") -> Explanation:
        """One map, with the least memory: nothing is cached and every stored activation is released as soon
        as the backward pass has gone below it."""
        return Trace(self.model, x, cache=False, consume=True).relevance(composite, target)


def _check_input(model: nn.Module, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"LRP input must be a torch.Tensor, got {type(x).__name__}")
    first = next((m for m in model.modules() if isinstance(m, _LINEAR)), None)
    if isinstance(first, nn.modules.conv._ConvNd):
        expected = first.weight.ndim
        if x.ndim != expected:
            raise ValueError(
                f"LRP input must be {expected}D (batch, channel, {expected - 2} spatial dims) for "
                f"{type(first).__name__}, got shape {tuple(x.shape)}"
            )
    if not torch.isfinite(x).all():
        raise ValueError("LRP input holds NaN or Inf values; no relevance map is computed for it")


class Trace:
    """A recorded forward pass of ``model`` on ``x``: the chain of layers with their inputs."""

    def __init__(self, model: nn.Module, x: torch.Tensor, cache: bool = True, consume: bool = False):
        model = _unwrap(model)
        self.consume = consume
        self._consumed = False
        _check_input(model, x)
        for name, module in model.named_modules():
            if isinstance(module, (_BATCHNORM, nn.modules.dropout._DropoutNd)) and module.training:
                raise RuntimeError(f"LRP needs the model in eval mode: {name or 'model'} ({type(module).__name__}) "
                                   "is in training mode; call model.eval() first")
        self.cache = cache
        self._stats: dict = {}
        # Per leaf module: (name, module, takes the previous module's output?, works in place?, input kept,
        # output kept, input shape). Only what a rule needs is held, so intermediate tensors are freed during the
        # forward pass as without the trace; the chain is checked in the hook while both tensors are alive.
        records: list[tuple] = []
        names = {m: n for n, m in model.named_modules()}
        handles = []
        last = [_ref(x)]

        def hook(module, inputs, output):
            inp = inputs[0] if inputs else None
            chained = inp is not None and inp is last[0]()
            inplace = output is inp
            last[0] = _ref(output)
            keep_in = inp if isinstance(module, _LINEAR + _AVGPOOL + _MAXPOOL) else None
            keep_out = output if isinstance(module, _AVGPOOL) else None
            shape = tuple(inp.shape) if isinstance(module, nn.Flatten) else None
            records.append((names[module], module, chained, inplace, keep_in, keep_out, shape))

        try:
            for module in model.modules():
                if next(module.children(), None) is None:
                    handles.append(module.register_forward_hook(hook))
            with torch.no_grad():
                self.logits = model(x)
        finally:
            for handle in handles:
                handle.remove()
        self.steps = self._build_steps(records, self.logits is last[0]())
        self._sign_sources = self._relu_outputs(self.steps)
        self._signs: dict[int, torch.Tensor] = {}  # consume mode: signs kept when their source is released

    @staticmethod
    def _relu_outputs(steps: list[_Step]) -> dict[int, int]:
        """{linear step k: step j whose kept input is the output of the ReLU that follows k}: k's output passes
        only through ReLU/Dropout/Identity modules (at least one ReLU) into module j, which keeps its input. Then
        ``steps[j].x > 0`` is exactly ``z > 0`` of layer k (rules that choose by the sign of z use it)."""
        sources = {}
        for k, step in enumerate(steps):
            if step.kind != "linear":
                continue
            j, relu = k + 1, False
            while j < len(steps) and steps[j].kind == "pass":
                relu = relu or isinstance(steps[j].module, nn.ReLU)
                j += 1
            if relu and j < len(steps) and steps[j].kind in ("linear", "avgpool", "maxpool") and steps[j].x is not None:
                sources[k] = j
        return sources

    def _silent_nonpositive(self, k: int, comp: Composite, position: dict, count: int, steps: list[_Step]) -> bool:
        """Whether no relevance can reach the outputs of linear step ``k`` where its ReLU gives 0: the layer that
        takes the ReLU's output computes relevance proportional to its input (average pooling's z-rule, or a rule
        with ``proportional``)."""
        j = self._sign_sources.get(k)
        if j is None:
            return False
        if steps[j].kind == "avgpool":
            return True
        return steps[j].kind == "linear" and comp.rule_for(position[j], count, steps[j].op).proportional

    def _positive(self, k: int) -> torch.Tensor | None:
        """``z > 0`` of linear step ``k`` where a ReLU follows it (see :meth:`_relu_outputs`), else None."""
        if k in self._signs:
            return self._signs.pop(k)
        j = self._sign_sources.get(k)
        source = None if j is None else self.steps[j].x
        return None if source is None else source > 0

    @staticmethod
    def _build_steps(records, output_is_last: bool) -> list[_Step]:
        if not records:
            raise UnsupportedModuleError("the model has no submodules to propagate through")
        steps: list[_Step] = []
        previous_name = "the model input"
        i = 0
        while i < len(records):
            name, module, chained, _, keep_in, keep_out, shape = records[i]
            if not chained:
                raise UnsupportedModuleError(
                    f"module {name} ({type(module).__name__}) does not take the output of {previous_name} as its "
                    "input: the network is not a plain chain of modules (a residual add, a concatenation or a "
                    "functional operation in forward()); LRP here covers chains only"
                )
            if isinstance(module, _LINEAR):
                bn = None
                if i + 1 < len(records) and isinstance(records[i + 1][1], _BATCHNORM) and records[i + 1][2]:
                    bn = records[i + 1][1]
                    i += 1
                steps.append(_Step("linear", name, module, x=keep_in, op=linear_op(module, name, bn)))
                if bn is not None:  # the chain continues from the BatchNorm's output
                    name, module = records[i][0], bn
            elif isinstance(module, _BATCHNORM):
                raise UnsupportedModuleError(
                    f"module {name} ({type(module).__name__}) does not follow a convolution or linear layer, so it "
                    "cannot be folded into one")
            elif isinstance(module, _PASS):
                steps.append(_Step("pass", name, module))
            elif isinstance(module, nn.Flatten):
                steps.append(_Step("flatten", name, module, input_shape=shape))
            elif isinstance(module, _AVGPOOL):
                nxt = records[i + 1] if i + 1 < len(records) else None
                reusable = nxt is None or not nxt[3]  # the next module does not overwrite it in place
                steps.append(_Step("avgpool", name, module, x=keep_in, out=keep_out if reusable else None))
            elif isinstance(module, _MAXPOOL):
                steps.append(_Step("maxpool", name, module, x=keep_in))
            else:
                raise UnsupportedModuleError(
                    f"module {name} ({type(module).__name__}) has no LRP rule here; supported: Conv/Linear "
                    "(+BatchNorm), ReLU, Dropout, Identity, AvgPool, MaxPool, Flatten")
            previous_name = f"{name} ({type(module).__name__})"
            i += 1
        if not output_is_last:
            raise UnsupportedModuleError(
                f"the model output is not the output of its last module {previous_name}: forward() changes it "
                "after the last module (e.g. a functional softmax), which LRP here cannot follow")
        return steps

    # -- backward -------------------------------------------------------------------------------------------
    def _start(self, target, steps: list[_Step]):
        logits = self.logits
        batch = logits.shape[0]
        if isinstance(target, str) and target in ("difference", "diff"):
            target = (1, 0)
        if isinstance(target, (tuple, list)):
            pos, neg = (int(t) for t in target)
            last = next((k for k in range(len(steps) - 1, -1, -1) if steps[k].kind != "pass"), None)
            if last is None or steps[last].kind != "linear" or steps[last].op.is_conv:
                raise UnsupportedModuleError("a logit-difference target needs a Linear output layer")
            op = steps[last].op
            bias = None if op.bias is None else (op.bias[pos] - op.bias[neg]).reshape(1)
            diff_op = LinearOp(op.module, op.name, (op.weight[pos] - op.weight[neg]).unsqueeze(0), bias)
            steps = steps[:last] + [_Step("linear", op.name, op.module, x=steps[last].x, op=diff_op)] + steps[last + 1:]
            start = logits[:, pos] - logits[:, neg]
            none = torch.full((batch,), -1, dtype=torch.long, device=logits.device)
            return start.unsqueeze(1).clone(), none, start, steps, (pos, neg)
        if target is None or target == "pred":
            classes = logits.argmax(dim=1)
        elif isinstance(target, torch.Tensor):
            classes = target.to(device=logits.device, dtype=torch.long).reshape(-1).expand(batch)
        elif isinstance(target, int) and not isinstance(target, bool):
            classes = torch.full((batch,), int(target), dtype=torch.long, device=logits.device)
        else:
            raise ValueError("target must be 'pred', a class index, 'difference' or a (class, class) pair, "
                             f"got {target!r}")
        if ((classes < 0) | (classes >= logits.shape[1])).any():
            raise ValueError(f"target class out of range for {logits.shape[1]} outputs: {classes.tolist()}")
        start = logits.gather(1, classes[:, None]).squeeze(1)
        relevance = torch.zeros_like(logits).scatter_(1, classes[:, None], start[:, None])
        return relevance, classes, start, steps, None

    def relevance(self, composite="a2b1", target="pred") -> Explanation:
        """Relevance of ``target`` for every input voxel under ``composite`` (a preset name, (alpha, beta) or a
        :class:`Composite`)."""
        comp: Composite = get_composite(composite)
        if self._consumed:
            raise RuntimeError("this trace was made for a single map (consume=True) and has been used; trace again")
        self._consumed = self.consume
        with torch.no_grad():
            relevance, classes, start, steps, pair = self._start(target, self.steps)
            linear_idx = [k for k, s in enumerate(steps) if s.kind == "linear"]
            position = {k: p for p, k in enumerate(linear_idx)}
            for k in range(len(steps) - 1, -1, -1):
                step = steps[k]
                if step.kind == "pass":
                    continue
                if step.kind == "flatten":
                    relevance = relevance.reshape(step.input_shape)
                elif step.kind == "linear":
                    rule = comp.rule_for(position[k], len(linear_idx), step.op)
                    # a logit difference's output layer is its own layer, one per (class, class) pair
                    modified = pair if k == linear_idx[-1] else None
                    key = (k, modified) + rule.cache_key()
                    stats = self._stats.get(key)
                    sign, silent = {}, {}
                    if getattr(rule, "uses_output_sign", False) and modified is None:
                        silent = {"silent": self._silent_nonpositive(k, comp, position, len(linear_idx), steps)}
                        if stats is None:
                            sign = {"positive": self._positive(k)}
                    if stats is None and not self.cache and hasattr(rule, "backward_once"):
                        relevance = rule.backward_once(step.op, step.x, relevance, **sign, **silent)
                    else:
                        if stats is None:
                            stats = rule.stats(step.op, step.x, **sign)
                            if self.cache:
                                self._stats[key] = stats
                        relevance = rule.backward(step.op, step.x, relevance, stats, reuse=self.cache, **silent)
                    del stats
                elif step.kind == "avgpool":
                    relevance = self._pool_backward(step, relevance, normalise=True)
                elif step.kind == "maxpool":
                    relevance = self._pool_backward(step, relevance, normalise=False)
                if self.consume:  # release what lies above the current layer (the signs a layer below needs kept)
                    for below, source in self._sign_sources.items():
                        rule_below = comp.rule_for(position[below], len(linear_idx), steps[below].op)
                        if source == k and step.x is not None and getattr(rule_below, "uses_output_sign", False):
                            self._signs[below] = step.x > 0
                    step.x = step.out = None
            dims = tuple(range(1, relevance.ndim))
            total = relevance.sum(dim=dims)
            conservation = total / torch.where(start == 0, torch.ones_like(start), start)
        return Explanation(relevance, self.logits.detach(), classes, start.detach(), conservation, comp.name)

    @staticmethod
    def _pool_backward(step: _Step, relevance: torch.Tensor, normalise: bool) -> torch.Tensor:
        """Average pooling: z-rule ``x * d(pool)/dx^T (R / stab(z))``; max pooling: winner takes all."""
        module = step.module
        backward = _AVGPOOL_BACKWARD.get(type(module))
        if normalise and backward is not None and step.out is not None:
            s = relevance / stabilize(step.out, _POOL_STABILIZER)
            grad = backward(s, step.x, _tuple(module.kernel_size, step.x),
                            _tuple(module.stride or module.kernel_size, step.x),
                            _tuple(module.padding, step.x), module.ceil_mode, module.count_include_pad,
                            module.divisor_override)
            return grad.mul_(step.x)
        with torch.enable_grad():
            x = step.x.detach().requires_grad_(True)
            z = step.module(x)
            grad_out = relevance / stabilize(z.detach(), _POOL_STABILIZER) if normalise else relevance
            (grad,) = torch.autograd.grad(z, x, grad_out)
        return x.detach() * grad if normalise else grad

    def clear_cache(self) -> None:
        self._stats.clear()
