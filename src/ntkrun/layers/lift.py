"""from_torch: the composition of ntkrun.layers that a torch model of supported layers is
(docs/science.md §12.10).

The model is traced with torch.fx; each node of its graph becomes a layer, and a node joining
tensors (x + y, torch.cat) becomes FanOut, parallel branches and a fan-in, the branches starting
at the join's immediate dominator (the last node every path from the input passes through): a
residual block x + f(x) is residual(f). Graphs that are not series-parallel, and any operation
outside the table below, are refused naming the node.

Parametrization. nn.Linear and nn.Conv2d are read with torch's default initialization (uniform
weights and biases of variance 1/(3 fan_in); a weight matrix whose variance says otherwise is
refused): the standard parametrization, whose NNGP is that of the NTK-parametrized composition
with W_std^2 = 1/3, b_std^2 = 1/(3 n0) on the layers reading the inputs and 0 behind a weight
layer (there fan_in grows with the width). Its NTK is the limit of sum_p Var(p) df/dp df/dp' (each
parameter's gradient weighted by its initial variance: gradient descent with a per-parameter
learning rate eta Var(p), which is NTK-parametrized gradient descent with rate eta); with one
learning rate for all parameters the NTK of the standard parametrization grows with the width.
ntkrun.layers' own modules are NTK-parametrized and read exactly (W_std, b_std as built).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch import fx, nn

from ntkrun.layers import activations as act
from ntkrun.layers.base import Layer, LayerError, Net
from ntkrun.layers.combinators import Concat, FanInSum, FanOut, Residual, parallel, serial
from ntkrun.layers.dense import Dense, DenseModule
from ntkrun.layers.normalization import LayerNorm, LayerNormModule
from ntkrun.layers.spatial import AvgPool, Conv, ConvModule, Flatten, GlobalAvgPool

DEFAULT_VARIANCE = 1 / 3  # fan_in x the variance of torch's default (kaiming_uniform(a=sqrt(5))) weights
_RELU = (torch.relu, nn.functional.relu, "relu")
_TANH = (torch.tanh, nn.functional.tanh, "tanh")
_ADD = (operator.add, torch.add, "add")


@dataclass(frozen=True)
class Lifted:
    """A model as a composition: `layers` (serial), the parametrization of its weight layers
    ('ntk', 'standard', or 'mixed') and its outputs."""

    layers: Layer
    parametrization: str
    n_out: int
    linear_on_inputs: bool = False  # its first layer an nn.Linear on the raw inputs (their last axis)
    uniform_fan_in: int | None = None  # the least fan-in of torch's uniform layers reading the inputs


def _one(layers: list[Layer]) -> Layer:
    return layers[0] if len(layers) == 1 else serial(*layers)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        ntkrun_leaf = isinstance(m, DenseModule | ConvModule | LayerNormModule | act.ActivationModule)
        return ntkrun_leaf or super().is_leaf_module(m, qualname)


def from_torch(model: nn.Module) -> Lifted:
    """The composition a torch model is (see the module's docstring), or LayerError naming the
    first operation that has none."""
    if isinstance(model, Net) and getattr(model, "composition", None) is not None:
        return Lifted(model.composition, "ntk", model.n_out)
    try:
        graph = _Tracer().trace(model)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise LayerError(
            f"from_torch: torch.fx cannot trace {type(model).__name__} ({type(err).__name__}: {first}); "
            "a forward pass without data-dependent control flow can be lifted"
        ) from None
    return _Graph(model, graph).lift()


class _Graph:
    def __init__(self, model: nn.Module, graph: fx.Graph) -> None:
        self.modules = dict(model.named_modules())
        self.nodes = list(graph.nodes)
        self.order = {node: i for i, node in enumerate(self.nodes)}
        inputs = [n for n in self.nodes if n.op == "placeholder"]
        if len(inputs) != 1:
            raise LayerError(f"from_torch: the model takes {len(inputs)} inputs, not one")
        self.input = inputs[0]
        self.dom: dict[fx.Node, set[fx.Node]] = {}
        for node in self.nodes:  # fx's order is topological
            preds = node.all_input_nodes
            common = set.intersection(*(self.dom[p] for p in preds)) if preds else set()
            self.dom[node] = common | {node}
        self.spatial: dict[fx.Node, bool | None] = {self.input: None}  # images/sequences (True), vectors
        self.behind: dict[fx.Node, bool] = {self.input: False}  # a weight layer before it
        self.kinds: set[str] = set()
        self.n_out = 1
        self.features: dict[fx.Node, int | None] = {self.input: None}  # the last weight layer's outputs
        self.visited: set[fx.Node] = set()
        self.linear_on_inputs = False  # nn.Linear on the raw inputs: their last axis (vectors, sequences)
        self.uniform_fan_in: int | None = None
        calls = [str(n.target) for n in self.nodes if n.op == "call_module"]
        for target in calls:  # one weight matrix in two places: correlated features, not two layers
            if calls.count(target) > 1 and any(True for _ in self.modules[target].parameters()):
                raise LayerError(
                    f"from_torch: {type(self.modules[target]).__name__} '{target}' is applied "
                    f"{calls.count(target)} times (shared weights have no layer: each is its own draw)"
                )

    def lift(self) -> Lifted:
        out = next(n for n in self.nodes if n.op == "output").args[0]
        if not isinstance(out, fx.Node):
            raise LayerError("from_torch: the model returns several tensors, not one")
        layers = self.chain(out, self.input)
        if not layers or not layers[-1].readout:
            raise LayerError("from_torch: the model does not end on nn.Linear (the readout)")
        kinds = self.kinds
        parametrization = kinds.pop() if len(kinds) == 1 else "mixed"
        inputs = self.linear_on_inputs, self.uniform_fan_in
        return Lifted(serial(*layers), parametrization, self.n_out, *inputs)

    def chain(self, node: fx.Node, stop: fx.Node) -> list[Layer]:
        """The layers from stop's output to node's output (stop dominates node)."""
        if node is stop:
            return []
        if node.op == "placeholder" or node in self.visited:  # a tensor used again outside its join
            raise LayerError(
                f"from_torch: the graph is not series-parallel ({self.what(node)} is used twice outside "
                "x + f(x), f(x) + g(x) or torch.cat of branches)"
            )
        self.visited.add(node)
        inplace = node.kwargs.get("inplace") or getattr(self.modules.get(str(node.target)), "inplace", False)
        method_ = node.op == "call_method" and str(node.target).endswith("_")  # x.relu_(), x.add_(y)
        if inplace or method_ or node.target in (operator.iadd, operator.imul):
            raise LayerError(f"from_torch: {self.what(node)} works in place; write x = f(x) (then it lifts)")
        preds = node.all_input_nodes
        if len(preds) > 1 and self.is_call(node, (*_ADD, torch.cat, torch.concat)):
            return self.join(node, stop, preds)
        if len(preds) > 1:
            raise LayerError(f"from_torch: {self.what(node)} is not supported (see ntkrun.layers.lift)")
        if not preds:
            raise LayerError(f"from_torch: {self.what(node)} does not take the input")
        before = self.chain(preds[0], stop)
        self.spatial[node], self.behind[node] = self.spatial[preds[0]], self.behind[preds[0]]
        self.features[node] = self.features[preds[0]]
        return before + self.layer(node)

    def join(self, node: fx.Node, stop: fx.Node, preds: list[fx.Node]) -> list[Layer]:
        if len(self.dom[node]) == 1:  # no node of the input's dominates it: a parameter joins in
            raise LayerError(f"from_torch: {self.what(node)} joins a tensor not computed from the input")
        start = max(self.dom[node] - {node}, key=self.order.__getitem__)
        before = self.chain(start, stop)
        branches = [self.chain(p, start) for p in preds]
        self.spatial[node] = self.spatial[preds[0]]
        self.behind[node] = any(self.behind[p] for p in preds)
        self.features[node] = self.features[preds[0]]
        if self.is_call(node, _ADD) and len(preds) == 2 and len(node.args) == 2 and not node.kwargs:
            empty = [b for b in branches if not b]
            if len(empty) == 1:
                return [*before, Residual(*next(b for b in branches if b))]
            if not empty:
                return [*before, FanOut(2), parallel(*map(_one, branches)), FanInSum()]
        if self.is_call(node, (torch.cat, torch.concat)) and all(branches):
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            parts = node.args[0] if node.args else node.kwargs.get("tensors", ())
            widths = {self.features[p] for p in preds}
            if len(parts) != len(preds) or None in widths or len(widths) > 1:  # concat averages equal widths
                raise LayerError(
                    f"from_torch: {self.what(node)} joins branches of {len(parts)} tensors of "
                    f"{sorted(self.features[p] or 0 for p in preds)} features (0: not a weight layer's); "
                    "concat needs distinct branches each ending past a weight layer of the same width"
                )
            if dim in (1, -1) and (dim == 1 or not self.spatial[node]):
                self.features[node] = sum(self.features[p] or 0 for p in preds)
                return [*before, Concat(*map(_one, branches))]
        raise LayerError(f"from_torch: {self.what(node)} joins tensors in a way with no layer (x + f(x), "
                         "f(x) + g(x) and torch.cat on the features are)")  # fmt: skip

    def layer(self, node: fx.Node) -> list[Layer]:
        if node.op == "call_module":
            return self.module(node, self.modules[str(node.target)])
        if node.op in ("call_function", "call_method"):
            return self.function(node)
        raise LayerError(f"from_torch: {self.what(node)} is not supported")

    def module(self, node: fx.Node, m: nn.Module) -> list[Layer]:
        if isinstance(m, nn.Linear | nn.Conv2d | DenseModule | ConvModule):
            return [self.weights(node, m)]
        if isinstance(m, nn.Identity):
            return []
        simple: dict[type, Layer] = {nn.ReLU: act.Relu(), nn.Tanh: act.Tanh()}
        if type(m) in simple:
            return [simple[type(m)]]
        if isinstance(m, nn.GELU) and m.approximate == "none":
            return [act.Gelu()]
        if isinstance(m, nn.LeakyReLU):
            return [act.LeakyRelu(m.negative_slope)]
        if isinstance(m, nn.Softplus) and m.beta == 1:
            return [act.Softplus()]
        if isinstance(m, act.ActivationModule):
            return [m.layer]
        if isinstance(m, nn.LayerNorm | LayerNormModule):
            return [self.layer_norm(node, m)]
        if isinstance(m, nn.AvgPool2d):
            k, s = m.kernel_size, m.stride or m.kernel_size
            plain = m.padding == 0 and not m.ceil_mode and m.divisor_override is None
            if isinstance(k, int) and s == k and plain:
                self.spatial[node] = True
                return [AvgPool(k)]
        if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1)):
            self.spatial[node] = False
            return [GlobalAvgPool()]
        if isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
            return self.flatten(node)
        raise LayerError(f"from_torch: {self.what(node)} is not supported (see ntkrun.layers.lift)")

    def function(self, node: fx.Node) -> list[Layer]:
        args = node.args[1:]
        if self.picks_the_output(node):
            return []
        if self.is_call(node, _RELU) and not args and set(node.kwargs) <= {"inplace"}:  # in place: refused
            return [act.Relu()]
        if self.is_call(node, _TANH) and not args and not node.kwargs:
            return [act.Tanh()]
        exact = node.kwargs.get("approximate", "none") == "none"  # torch's tanh approximation has none
        if self.is_call(node, (nn.functional.gelu, "gelu")) and exact:
            return [act.Gelu()]
        if self.is_call(node, (torch.flatten, "flatten")) and tuple(args) == (1,) and not node.kwargs:
            return self.flatten(node)
        dims = node.kwargs.get("dim", args[0] if args else None)
        if self.is_call(node, (torch.mean, "mean")) and isinstance(dims, tuple | list) and len(args) <= 1:
            if tuple(dims) in ((2, 3), (-2, -1)):  # images' positions (keepdim or not: flatten is a no-op)
                self.spatial[node] = False
                return [GlobalAvgPool()]
        raise LayerError(f"from_torch: {self.what(node)} is not supported (see ntkrun.layers.lift)")

    def picks_the_output(self, node: fx.Node) -> bool:
        """y[:, 0], y.squeeze(-1), y.flatten() or y.view(-1) of the readout's outputs as the model's
        output: the same network of one output, the same kernel."""
        if [user.op for user in node.users] != ["output"] or self.spatial[node]:
            return False
        args = node.args[1:]
        picked = (
            self.is_call(node, (operator.getitem,)) and len(args) == 1 and isinstance(args[0], tuple)
            and len(args[0]) == 2 and args[0][0] == slice(None) and isinstance(args[0][1], int)
        ) or (
            self.is_call(node, ("squeeze",)) and tuple(args) in ((-1,), (1,))
        ) or (self.is_call(node, ("flatten", "view", "reshape")) and tuple(args) in ((), (-1,)))  # fmt: skip
        if picked:
            self.n_out = 1
        return picked

    def flatten(self, node: fx.Node) -> list[Layer]:
        was, self.spatial[node] = self.spatial[node], False
        return [] if was is False else [Flatten()]  # a vector (after global pooling) stays one

    def weights(self, node: fx.Node, m: nn.Module) -> Layer:
        first = not self.behind[node]
        self.behind[node] = True
        if isinstance(m, DenseModule | ConvModule):
            self.kinds.add("ntk")
            fan_in = m.weight[0].numel()
            W_std = (m.w_scale if isinstance(m, DenseModule) else m.scale) * math.sqrt(fan_in)
            b_std = m.b_std if m.bias is not None else 0.0
        else:
            self.kinds.add("standard")
            fan_in = m.weight[0].numel()
            self.check_default(node, "weights", m.weight, fan_in)
            zero = m.bias is None or not bool(m.bias.detach().any())  # nn.init.zeros_: no bias term
            if first and not zero:
                self.check_default(node, "biases", m.bias, fan_in)
            W_std = math.sqrt(DEFAULT_VARIANCE)
            b_std = math.sqrt(DEFAULT_VARIANCE / fan_in) if first and not zero else 0.0
            if first:
                self.uniform_fan_in = min(fan_in, self.uniform_fan_in or fan_in)
        if self.spatial[node] and isinstance(m, nn.Linear):
            raise LayerError(f"from_torch: {self.what(node)} on images acts on their last axis (columns), "
                             "not on their channels: flatten or pool first")  # fmt: skip
        self.linear_on_inputs |= first and isinstance(m, nn.Linear) and self.spatial[node] is None
        self.features[node] = m.weight.shape[0]
        if isinstance(m, nn.Linear | DenseModule):
            self.n_out = m.weight.shape[0]
            return Dense(W_std, b_std)
        self.spatial[node] = True
        if isinstance(m, ConvModule):
            return Conv(m.k, m.padding, W_std, b_std)
        return self.conv(node, m, W_std, b_std)  # type: ignore[arg-type]

    def check_default(self, node: fx.Node, what: str, values: torch.Tensor, fan_in: int) -> None:
        """LayerError unless fan_in x the mean square of `values` is torch's default 1/3, within 10%
        or 8 standard errors of its estimate (uniform draws: relative variance 0.8 / count)."""
        n = values.numel()
        ratio = fan_in * float(values.detach().double().pow(2).mean()) / DEFAULT_VARIANCE
        if abs(ratio - 1) > max(0.1, 8 * math.sqrt(0.8 / n)):
            raise LayerError(
                f"from_torch: {self.what(node)}: its {what}' variance is {ratio:.3g} times torch's default "
                "1/(3 fan_in); from_torch reads the default initialization only"
            )

    def conv(self, node: fx.Node, m: nn.Conv2d, W_std: float, b_std: float) -> Layer:
        k = m.kernel_size[0]
        simple = m.stride == (1, 1) and m.dilation == (1, 1) and m.groups == 1 and m.kernel_size == (k, k)
        padding = {(0, 0): "valid", "valid": "valid", "same": "same", (k // 2, k // 2): "same"}.get(m.padding)
        if m.padding_mode == "circular" and padding == "same":
            padding = "circular"
        elif m.padding_mode != "zeros":
            padding = None
        if not simple or k % 2 == 0 or padding is None:
            raise LayerError(
                f"from_torch: {self.what(node)}: only odd square kernels, stride 1, no dilation or groups, "
                "padding 0 or kernel_size // 2 (zeros or circular) have a layer"
            )
        return Conv(k, padding, W_std, b_std)

    def layer_norm(self, node: fx.Node, m: nn.Module) -> Layer:
        if isinstance(m, nn.LayerNorm):
            if m.elementwise_affine or len(m.normalized_shape) != 1 or self.spatial[node] or m.eps > 1e-5:
                raise LayerError(
                    f"from_torch: {self.what(node)}: LayerNorm over the last axis of vectors or sequences "
                    "without affine parameters (elementwise_affine=False), eps at most 1e-5, has a layer"
                )
        return LayerNorm()

    @staticmethod
    def is_call(node: fx.Node, targets: tuple[object, ...]) -> bool:
        if node.op == "call_method":
            return node.target in targets
        return node.op == "call_function" and any(node.target is t for t in targets if not isinstance(t, str))

    def what(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"{type(self.modules[str(node.target)]).__name__} '{node.target}'"
        target = getattr(node.target, "__name__", str(node.target))
        return f"{target} ({node.op.replace('_', ' ')} '{node.name}')"
