"""What every stitch pass shares: a common signature, contracts stated as sentences, values found by name.

A pass is an ``onnx_ir`` in-place pass: ``pass_(model)`` checks :meth:`StitchPass.requires`, rewrites the
model in :meth:`StitchPass.apply`, then checks :meth:`StitchPass.ensures`. A contract that does not hold
raises :class:`StitchError` (a :class:`merge.errors.MergeError`: one sentence for the user) before the graph
is touched. Passes take nothing from each other by hand: each finds the values it works on in the model by
their names (:mod:`merge.contract.names`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import onnx_ir as ir

from merge.errors import MergeError

log = logging.getLogger("merge.stitch.passes")


class StitchError(MergeError):
    """A part does not have the structure a pass relies on."""


class StitchPass(ir.passes.InPlacePass):
    """An in-place pass with its contracts; subclasses implement :meth:`apply`, which says whether it changed the
    model (and the checks they need). A broken contract surfaces as a :class:`StitchError` naming the pass."""

    #: one line for ``merge build --debug``
    summary = ""

    def __call__(self, model_or_result: ir.Model | ir.passes.PassResult, /) -> ir.passes.PassResult:
        try:
            return super().__call__(model_or_result)
        except (ir.passes.PreconditionError, ir.passes.PostconditionError) as exc:
            if isinstance(exc.__cause__, MergeError):
                raise StitchError(f"{self}: {exc.__cause__}") from exc.__cause__
            raise

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        log.debug("pass %s: %s", self, self.summary)
        return ir.passes.PassResult(model, modified=self.apply(model))

    def apply(self, model: ir.Model) -> bool:
        """Rewrite ``model`` in place; return whether anything changed."""
        raise NotImplementedError

    def __str__(self) -> str:
        return type(self).__name__


def run_passes(model: ir.Model, passes: Sequence[ir.passes.PassBase]) -> ir.Model:
    """Run ``passes`` in order as one onnx_ir ``Sequential`` (the pass manager's single step: its error names the
    failing pass where ``PassManager`` would say only the step). A broken contract, or any error meant for the user,
    surfaces as itself (a :class:`MergeError`: one sentence, a :class:`StitchError` naming the pass); anything else
    as onnx_ir's ``PassError`` naming the pass it happened in."""
    log.debug("stitch passes: %s", ", ".join(type(p).__name__ for p in passes))
    try:
        return ir.passes.Sequential(*passes)(model).model
    except ir.passes.PassError as exc:
        cause = exc.__cause__
        while cause is not None and not isinstance(cause, MergeError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from cause.__cause__
        raise


# -- finding things by name ---------------------------------------------------------------------------------------

def graph_input(graph: ir.Graph, name: str, who: str) -> ir.Value:
    for value in graph.inputs:
        if value.name == name:
            return value
    raise StitchError(f"{who}: the model has no input {name!r} (inputs: {[v.name for v in graph.inputs]})")


def has_input(graph: ir.Graph, name: str) -> bool:
    return any(v.name == name for v in graph.inputs)


def find_value(graph: ir.Graph, name: str) -> ir.Value | None:
    """The value called ``name`` in the main graph: an input, an initializer, or a node's output."""
    return ir.convenience.create_value_mapping(graph, include_subgraphs=False).get(name)


def require_value(graph: ir.Graph, name: str, who: str) -> ir.Value:
    value = find_value(graph, name)
    if value is None:
        raise StitchError(f"{who}: the model has no value {name!r}; an earlier pass did not run")
    return value


def find_node(graph: ir.Graph, name: str) -> ir.Node | None:
    return next((n for n in graph if n.name == name), None)


# -- parts -----------------------------------------------------------------------------------------------------------

def inline_part(target: ir.Graph, part: ir.Model, feeds: dict[str, ir.Value], who: str,
                weights_to: ir.Graph | None = None) -> dict[str, ir.Value]:
    """Move a part's nodes into ``target`` and its initializers into ``weights_to`` (default ``target``: a
    subgraph reads the main graph's initializers by name), with its inputs bound to ``feeds``; returns its
    outputs by name. The part's graph is left empty."""
    graph = part.graph
    names = [v.name for v in graph.inputs]
    if set(names) != set(feeds):
        raise StitchError(f"{who}: the part's inputs {names} do not match the values wired to them {sorted(feeds)}")
    outputs = {v.name: v for v in graph.outputs}
    for inp in list(graph.inputs):
        ir.convenience.replace_all_uses_with(inp, feeds[inp.name])
    nodes = list(graph)
    graph.remove(nodes, safe=False)
    graph.outputs.clear()
    inits = list(graph.initializers.values())
    graph.initializers.clear()
    target.extend(nodes)
    for init in inits:
        (weights_to or target).register_initializer(init)
    return outputs
