"""Property test of the receptive-field pass (scalecert.export.receptive) against measured dependence.

A fixed-seed campaign of small random ONNX prefixes (benchmarks/graphgen.py: opset 18, 1-3 channels,
10-20 px, chains of 1-5 layers with forks joined by Add / Concat) over every op and attribute the pass
must accept, plus one layer the pass must refuse in a quarter of the graphs. For every accepted value,
ONNX Runtime (CPU) measures which output positions change when all channels of one input pixel are
perturbed by large amounts (every pixel, three trials); each such dependence must lie inside the RF
box. The pass must accept the local graphs, refuse the others with a one-line reason naming the node,
and ONNX Runtime must agree with the inferred output sizes.

Negative controls: the same harness, the pass handed a mutated copy (Conv dilations stripped,
BatchNormalization training_mode stripped, a Slice start below -dim read as start + dim) while the
real graph is measured, must report violations.

The longer campaign, and replaying / shrinking one failure: `python benchmarks/receptive_property.py`.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest

from conftest import ROOT

SEED = 20240611
GRAPHS = 400  # a quarter of them with a layer that must be refused
CONTROL_GRAPHS = 16


def _graphgen():
    """benchmarks/graphgen.py, loaded from its file (bare `pytest` does not put the root on sys.path)."""
    name = "receptive_graphgen"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", "graphgen.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]


gg = _graphgen()


@pytest.fixture(scope="module")
def campaign():
    cases = gg.campaign(SEED, GRAPHS)
    results = [gg.check(case) for case in cases]
    summary = gg.summarize(results)
    print("\nreceptive property:", gg.summary_line(summary))
    return results, summary


def _message(results, summary) -> str:
    """The counts, and per kind of failure the smallest case shrunk to a minimal graph (ONNX text)."""
    return f"{gg.summary_line(summary)}\n{gg.failure_report(results, limit=1, shrink_with={})}"


def test_campaign_exercises_every_op_and_attribute(campaign):
    results, summary = campaign
    assert summary["graphs"] == GRAPHS and summary["refuse_cases"] >= len(gg.REFUSE_LAYERS)
    measured = [r for r in results if r.pixels]
    assert summary["pixels"] >= 100 * GRAPHS and summary["checked_values"] >= 2 * GRAPHS, gg.summary_line(summary)
    covered = set().union(*(r.case.tags for r in measured))
    assert not gg.REQUIRED_TAGS - covered, f"never generated and measured: {sorted(gg.REQUIRED_TAGS - covered)}"
    assert {r.case.refused_layer for r in results if r.case.kind == "refuse"} == set(gg.REFUSE_LAYERS)


def test_every_measured_dependence_is_inside_the_receptive_field(campaign):
    results, summary = campaign
    assert summary["violations"] == 0 and summary["violating_pairs"] == 0, _message(results, summary)


def test_local_graphs_are_accepted(campaign):
    results, summary = campaign
    assert summary["wrongly_refused"] == 0, _message(results, summary)
    unexplained = [r.case.describe() for r in results
                   if r.case.kind == "accept" and not r.accepted and not r.allowed_refusal]
    assert not unexplained, _message(results, summary)


def test_nonlocal_layers_are_refused_with_a_one_line_reason_naming_the_node(campaign):
    results, summary = campaign
    assert summary["wrongly_accepted"] == 0 and summary["bad_reasons"] == 0, _message(results, summary)
    assert all(not r.accepted for r in results if r.case.kind == "refuse"), _message(results, summary)


def test_runtime_output_sizes_match_the_inferred_shapes(campaign):
    results, summary = campaign
    assert summary["shape_mismatches"] == 0 and summary["errors"] == 0, _message(results, summary)


@pytest.mark.parametrize("control", sorted(gg.CONTROLS))
def test_negative_control_is_caught(control):
    """A pass that ignores one attribute (simulated by mutating its copy of the graph) must show up
    as footprints too small on the real graph."""
    force, mutate = gg.CONTROLS[control]
    results = [gg.check(gg.generate(SEED, i, "accept", force=force), mutate=mutate) for i in range(CONTROL_GRAPHS)]
    summary = gg.summarize(results)
    ran = [r for r in results if r.skipped is None]
    assert len(ran) >= CONTROL_GRAPHS // 2, [r.skipped for r in results]
    assert summary["errors"] == 0, [r.error for r in results if r.error]
    assert summary["violations"] > 0 and summary["violating_pairs"] > 0, gg.summary_line(summary)
    # the harness catches it in most graphs, not by luck in one
    assert summary["violations"] >= len(ran) // 2, gg.summary_line(summary)


def _known(kind: str, c: int, h: int, w: int, build) -> "gg.Case":
    """A hand-written case: `build(builder, image) -> output` with the generator's builder."""
    import numpy as np

    b = gg.Builder(np.random.default_rng(0), c, h, w)
    first = len(b.nodes)
    out, refused = build(b, gg.IMAGE)
    b.settle(out)
    model = gg.infer(b.model([out]))
    refused_nodes = [(n.name, n.op_type) for n in b.nodes[first:] if n.name in refused]
    downstream = gg.downstream_of(model, {o for n in model.graph.node if n.name in refused for o in n.output})
    return gg.Case(SEED, 10**6, kind, model, (c, h, w), list(b.layers), set(b.tags), "known" if refused else None,
                   refused_nodes, b.nodes[-1].output[0] if refused else None, downstream)


def test_the_two_known_bugs():
    """Regressions the harness exists for: BatchNormalization(training_mode=1) treated as point-wise,
    and Slice(starts=[-1000], ends=[30], axes=[2]) taking the start as -1000 + dim, not 0."""
    import numpy as np

    def bn_training(b, v):
        v = b.node("Conv", [v, b.const(np.ones((2, 2, 3, 3), np.float32))], pads=[1, 1, 1, 1])[0]
        out = b.node("BatchNormalization", [v] + [b.const(np.full(2, k, np.float32)) for k in (1, 0, 0, 1)],
                     outputs=3, training_mode=1)
        return out[0], {b.nodes[-1].name}

    def slice_below(b, v):
        v = b.node("Slice", [v, b.ints([-1000]), b.ints([30]), b.ints([2])])[0]
        return b.node("Conv", [v, b.const(np.ones((1, 2, 3, 3), np.float32))])[0], set()

    refused = gg.check(_known("refuse", 2, 12, 12, bn_training))
    assert not refused.failed and not refused.accepted, (refused.wrongly_accepted, refused.bad_reasons)
    sliced = gg.check(_known("accept", 2, 12, 12, slice_below))
    assert sliced.accepted and not sliced.failed, (sliced.violations, sliced.wrongly_refused, sliced.error)
    assert sliced.pixels == 144 and sliced.checked_values == 2
    # and the mutations that simulate those bugs make the same cases fail
    assert gg.check(_known("accept", 2, 12, 12, bn_training), mutate=gg.strip_bn_training).violations
    assert gg.check(_known("accept", 2, 12, 12, slice_below), mutate=gg.unclamp_slice_starts).violations
