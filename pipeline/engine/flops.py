"""Forward FLOPs split by kind of work: attention, projection, ffn, convolution, recurrence, other.

Self-attention's scores and mixing cost O(n²·d) for n positions of width d; its projections and the FFN cost
O(n·d²); a recurrent layer O(n·d²) in n steps that run one after another. To fit each term against n and d they
must be counted apart.

The split rides on the FlopCounterMode pass that counts the total (pipeline/engine/cost.py): every FLOP formula of
torch's registry is wrapped so that, as it counts an op, it also adds the count to the kind of module running at
that moment. Each counted op lands in exactly one kind, so the kinds sum to the total exactly.

Which kind is running is decided by the modules being called (a stack kept by forward hooks), by their class:
- a class in MODULE_KINDS starts its kind (MultiHeadAttention → attention, FeedForward → ffn, the recurrent
  stacks and cells → recurrence);
- a module called inside an attention module is one of its projections (Q, K, V, output; Luong attention's
  combining layer and additive score layers count here too); inside any other kind it keeps that kind;
- a convolution op is convolution wherever it runs (nn.Conv*, a functional conv, a ViT's patch embedding);
- everything else is other: embeddings and input projections, output heads, and the layers of a plain MLP.
  `ffn` is the Transformer's position-wise FFN only, the term that grows as n·d²; an MLP has no positions.

Only the forward pass is split (the backward runs outside the modules' forward calls). What FlopCounterMode does
not count is in no kind: torch's fused LSTM (`impl: torch`) runs as one oneDNN kernel on the CPU that it does not
see, so such a model's recurrence (and its flops_forward_per_sample) reads 0 there; its RNN and GRU are counted.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from models.layers.attention import MultiHeadAttention
from models.layers.recurrent import FusedRNN, GRUCell, LSTMCell, RecurrentLayer, RNNCell, StackedRNN
from models.layers.transformer_layers import FeedForward
from models.seq2seq_rnn import GlobalAttention
from pipeline.engine.runfiles import FlopsByKind

KINDS: tuple[str, ...] = tuple(FlopsByKind.model_fields)  # attention, projection, ffn, convolution, recurrence, other
INSIDE_ATTENTION = "projection"  # what an attention module calls: its Q/K/V/output projections
NO_KIND = "other"

# The one table from module class to kind; subclasses count as their base (nn.LSTM is an nn.RNNBase). torch's own
# nn.MultiheadAttention is left out: its Q/K/V projection is a weight it applies itself, not a module it calls,
# so it could not be told from the scores (no family here uses it).
MODULE_KINDS: dict[type[nn.Module], str] = {
    MultiHeadAttention: "attention", GlobalAttention: "attention",
    FeedForward: "ffn",
    StackedRNN: "recurrence", FusedRNN: "recurrence", RecurrentLayer: "recurrence", RNNCell: "recurrence",
    LSTMCell: "recurrence", GRUCell: "recurrence", nn.RNNBase: "recurrence", nn.RNNCellBase: "recurrence",
}


def _convolution_ops() -> frozenset:
    """The convolution ops torch's FLOP registry counts (forward and backward), whatever module runs them."""
    aten = torch.ops.aten
    return frozenset({aten.convolution, aten._convolution, aten.cudnn_convolution, aten._slow_conv2d_forward,
                      aten.convolution_overrideable, aten.convolution_backward})


@contextlib.contextmanager
def countable_attention():
    """Math SDPA and no MHA fast path: the only attention kernels FlopCounterMode sees on the CPU."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def module_kind(module: nn.Module, enclosing: str | None) -> str:
    """The kind of work `module` does when called inside a module of kind `enclosing` (None: at the top)."""
    if enclosing == "attention":
        return INSIDE_ATTENTION
    if enclosing not in (None, NO_KIND):
        return enclosing  # the whole of an FFN is ffn, the whole of a recurrent layer recurrence
    return next((kind for cls, kind in MODULE_KINDS.items() if isinstance(module, cls)), NO_KIND)


class KindTracker:
    """The kind of the module running now: a stack, pushed as a module's forward starts and popped as it ends."""

    def __init__(self) -> None:
        self.stack: list[str] = []

    def current(self) -> str:
        return self.stack[-1] if self.stack else NO_KIND

    def enter_module(self, module: nn.Module, args) -> None:
        self.stack.append(module_kind(module, self.stack[-1] if self.stack else None))

    def leave_module(self, module: nn.Module, args, output) -> None:
        if self.stack:
            self.stack.pop()


@contextlib.contextmanager
def tracking_kinds() -> Iterator[KindTracker]:
    """A KindTracker fed by global forward hooks on every module, removed on the way out (a failure included)."""
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
    tracker = KindTracker()
    handles = [register_module_forward_pre_hook(tracker.enter_module),
               register_module_forward_hook(tracker.leave_module, always_call=True)]  # popped when forward raises
    try:
        yield tracker
    finally:
        for handle in handles:
            handle.remove()


def kind_formulas(tracker: KindTracker, flops: dict[str, int]) -> dict:
    """torch's FLOP formulas, each also adding its count to flops[kind]: a custom_mapping for FlopCounterMode."""
    from torch.utils.flop_counter import flop_registry
    convolutions = _convolution_ops()

    def tagged(op, formula):
        def count(*args, **kwargs) -> int:
            n = formula(*args, **kwargs)
            flops["convolution" if op in convolutions else tracker.current()] += n
            return n
        count._get_raw = True  # takes the raw arguments, as the registry's own (already wrapped) formulas do
        return count

    return {op: tagged(op, formula) for op, formula in flop_registry.items()}


def count_flops_by_kind(fn: Callable[[], object]) -> tuple[int, dict[str, int]]:
    """FLOPs of everything `fn` runs: FlopCounterMode's total (as cost.count_flops counts it) and the same FLOPs
    split by kind (they sum to the total)."""
    from torch.utils.flop_counter import FlopCounterMode
    flops = dict.fromkeys(KINDS, 0)
    with tracking_kinds() as tracker, countable_attention(), \
            FlopCounterMode(display=False, custom_mapping=kind_formulas(tracker, flops)) as counter:
        fn()
    return int(counter.get_total_flops()), flops


def flops_by_kind(model: nn.Module, forward, x: torch.Tensor, y: torch.Tensor) -> tuple[float, dict[str, float]]:
    """FLOPs per sample of one inference forward pass (eval mode, no gradients): the total, as
    cost.forward_flops counts it, and the same split by kind."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            total, flops = count_flops_by_kind(lambda: forward(model, x, y))
    finally:
        model.train(was_training)
    return total / len(x), {kind: n / len(x) for kind, n in flops.items()}
