"""ONNX Runtime CPU latency of the deploy-form FP32 export against the training-form export.

``run(out)`` exports rsdet_atto (random weights, GRN and offset predictors woken up) twice
from the same model: as before the deploy form existed (``form="training"``, opset 19)
and as ``export_onnx`` now writes it (``form="deploy"``, opset 20). It checks both against
the torch model (fp32 parity tolerance), counts their op types, times them interleaved
(batch 1, ``threads`` intra-op threads, one run of each per round, the order rotating)
and reports the median of the per-round ratios training ms / deploy ms with its p10-p90
spread, so that load from other users of the shared machine hits both alike. ORT's
profiler gives each graph's op-time shares: where the time goes.

Ablations, each the deploy graph with one choice undone by a graph rewrite (same
weights, timed in the same rounds), record why the deploy form is what it is:

- ``GELU as Erf formula``: ``x/sqrt2 -> Erf -> +1 -> *x -> *0.5``, which ORT fuses into
  its own contrib ``Gelu`` instead of running the opset-20 ``Gelu`` kernel;
- ``GRN sum of squares``: ``Mul + ReduceSum + Sqrt`` instead of ``ReduceL2``;
- ``LayerNorm by channel reductions``: LayerNorm over NCHW channels as ReduceMean, Sub,
  Mul, ReduceMean, Add, Sqrt, Div, Mul, Add, instead of Transpose, LayerNormalization,
  Transpose (which ORT folds into its NCHWc reorders).

No argparse here: ``edgekit bench`` calls :func:`run`.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

TARGET_SPEEDUP = 1.3
CENSUS_OPS = ("CastLike", "Expand", "SequenceAt", "SplitToSequence", "Shape", "Transpose", "MatMul", "Conv",
              "Erf", "Gelu", "ReduceL2", "LayerNormalization", "DeformConv")
BASELINE, DEPLOY = "training form (opset 19)", "deploy form (opset 20)"


def _session(path: Path, threads: int, profile_prefix: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def op_time_shares(path: Path, feed: dict, threads: int, runs: int = 10, top: int = 12) -> dict:
    """ORT profiler over ``runs`` inferences: total kernel ms per inference and the ``top``
    op types' shares of it (percent)."""
    session = _session(path, threads, profile_prefix=str(Path(tempfile.gettempdir()) / "edgekit_deploy_profile"))
    for _ in range(runs):
        session.run(None, feed)
    trace = Path(session.end_profiling())
    per_op: Counter = Counter()
    try:
        for event in json.loads(trace.read_text()):
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                per_op[event["args"]["op_name"]] += event["dur"]
    finally:
        trace.unlink(missing_ok=True)
    total = sum(per_op.values())
    return {"kernel_ms_per_inference": round(total / runs / 1e3, 2),
            "shares_percent": {op: round(100 * us / total, 1) for op, us in per_op.most_common(top)}}


# ------------------------------------------------------------------------- ablations


def _replace_nodes(model, op_type: str, expand) -> int:
    """Replace every ``op_type`` node by ``expand(node, fresh_name)`` (a list of nodes)."""
    kept, count = [], 0
    for node in model.graph.node:
        if node.op_type == op_type:
            kept += expand(node, f"_abl{count}")
            count += 1
        else:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return count


def _constants(model, values: dict) -> None:
    import numpy as np
    from onnx import numpy_helper

    model.graph.initializer.extend(numpy_helper.from_array(np.asarray(v), name) for name, v in values.items())


def gelu_as_erf(model) -> int:
    """Gelu -> the Erf formula (standard opset-13 ops)."""
    import numpy as np
    from onnx import helper

    _constants(model, {"abl_sqrt2": np.float32(2 ** 0.5), "abl_one": np.float32(1), "abl_half": np.float32(0.5)})

    def expand(node, s):
        x, y = node.input[0], node.output[0]
        return [helper.make_node("Div", [x, "abl_sqrt2"], [f"a{s}"]),
                helper.make_node("Erf", [f"a{s}"], [f"e{s}"]),
                helper.make_node("Add", [f"e{s}", "abl_one"], [f"p{s}"]),
                helper.make_node("Mul", [x, f"p{s}"], [f"m{s}"]),
                helper.make_node("Mul", [f"m{s}", "abl_half"], [y])]
    return _replace_nodes(model, "Gelu", expand)


def grn_sum_of_squares(model) -> int:
    """ReduceL2(x, axes) -> Sqrt(ReduceSum(x * x, axes))."""
    from onnx import helper

    def expand(node, s):
        x, y = node.input[0], node.output[0]
        keep = [a for a in node.attribute if a.name == "keepdims"]
        reduce = helper.make_node("ReduceSum", [f"q{s}", *node.input[1:]], [f"r{s}"])
        reduce.attribute.extend(keep)
        return [helper.make_node("Mul", [x, x], [f"q{s}"]), reduce, helper.make_node("Sqrt", [f"r{s}"], [y])]
    return _replace_nodes(model, "ReduceL2", expand)


def layernorm_by_channel_reductions(model) -> int:
    """Transpose(NCHW->NHWC) -> LayerNormalization -> Transpose(back) -> the channel-axis
    formula on NCHW; other LayerNormalization nodes are left as they are."""
    import numpy as np
    from onnx import helper

    producers = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    dead, new, count = set(), {}, 0
    _constants(model, {"abl_axis1": np.array([1], np.int64)})
    for node in model.graph.node:
        if node.op_type != "LayerNormalization":
            continue
        before, after = producers.get(node.input[0]), consumers.get(node.output[0], [])
        if before is None or before.op_type != "Transpose" or len(after) != 1 or after[0].op_type != "Transpose" \
                or len(consumers.get(before.output[0], [])) != 1:
            continue
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        s, x, y = f"_ln{count}", before.input[0], after[0].output[0]
        _constants(model, {f"eps{s}": np.float32(eps), f"shape{s}": np.array([-1, 1, 1], np.int64)})
        nodes = [helper.make_node("ReduceMean", [x, "abl_axis1"], [f"u{s}"]),
                 helper.make_node("Sub", [x, f"u{s}"], [f"d{s}"]),
                 helper.make_node("Mul", [f"d{s}", f"d{s}"], [f"dd{s}"]),
                 helper.make_node("ReduceMean", [f"dd{s}", "abl_axis1"], [f"v{s}"]),
                 helper.make_node("Add", [f"v{s}", f"eps{s}"], [f"ve{s}"]),
                 helper.make_node("Sqrt", [f"ve{s}"], [f"sd{s}"]),
                 helper.make_node("Div", [f"d{s}", f"sd{s}"], [f"n{s}"]),
                 helper.make_node("Reshape", [node.input[1], f"shape{s}"], [f"w{s}"]),
                 helper.make_node("Mul", [f"n{s}", f"w{s}"], [f"nw{s}"])]
        if len(node.input) > 2 and node.input[2]:
            nodes += [helper.make_node("Reshape", [node.input[2], f"shape{s}"], [f"b{s}"]),
                      helper.make_node("Add", [f"nw{s}", f"b{s}"], [y])]
        else:
            nodes[-1].output[0] = y
        new[id(after[0])] = nodes
        dead |= {id(before), id(node)}
        count += 1
    order = []
    for node in model.graph.node:
        if id(node) in dead:
            continue
        order += new.get(id(node), [node])
    del model.graph.node[:]
    model.graph.node.extend(order)
    return count


ABLATIONS = {"GELU as Erf formula": gelu_as_erf, "GRN sum of squares": grn_sum_of_squares,
             "LayerNorm by channel reductions": layernorm_by_channel_reductions}


# ------------------------------------------------------------------------------- run


def _census(path: Path) -> dict:
    import onnx

    from edgekit.export.onnx_checks import op_types

    ops = op_types(onnx.load(str(path)))
    return {op: ops.get(op, 0) for op in CENSUS_OPS} | {"nodes": sum(ops.values())}


def _model(image_size: int, seed: int):
    import torch

    from edgekit.models import create_model

    torch.manual_seed(seed)
    model = create_model("rsdet_atto").eval()
    generator = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():  # zero-initialised ones would make GRN and DCN trivial
        if name.endswith(("grn.gamma", "grn.beta")):
            p.data = torch.randn(p.shape, generator=generator) * 0.5
        elif "conv_offset" in name:
            p.data = torch.randn(p.shape, generator=generator) * 0.05
    return model


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run(out: Path, *, image_size: int = 256, rounds: int = 40, threads: int = 2, budget_s: float = 240.0,
        ablations: bool = True, seed: int = 0) -> dict:
    """Measure, write ``out/deploy_form_cpu.json`` and ``.md``, return the record."""
    import numpy as np
    import onnx

    from edgekit.benchmarks.latency import measure_interleaved, ratio_of_rounds
    from edgekit.export.parity import check_parity
    from edgekit.export.to_onnx import export_onnx, read_metadata
    from edgekit.fileio import write_results
    from edgekit.sysinfo import environment

    out = Path(out)
    model = _model(image_size, seed)
    images = np.random.default_rng(seed).standard_normal((1, 3, image_size, image_size)).astype(np.float32)
    feed = {"images": images}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"exporting rsdet_atto at {image_size} px: training form, deploy form")
        files = {BASELINE: export_onnx(model, tmp / "training.onnx", image_size=image_size, form="training", opset=19),
                 DEPLOY: export_onnx(model, tmp / "deploy.onnx", image_size=image_size)}
        rewritten = {}
        if ablations:
            for name, rewrite in ABLATIONS.items():
                proto = onnx.load(str(files[DEPLOY]))
                rewritten[name] = rewrite(proto)
                files[f"deploy, {name}"] = tmp / f"ablation{len(rewritten)}.onnx"
                onnx.save(proto, str(files[f"deploy, {name}"]))
        parity = {}
        for name, path in files.items():
            report = check_parity(model, path, [images], "fp32", raise_on_failure=False)
            parity[name] = {"passed": report["passed"],
                            "max_abs_err": {k: v.get("max_abs_err") for k, v in report["outputs"].items()}}
        sessions = {name: _session(path, threads) for name, path in files.items()}
        print(f"timing {len(sessions)} graphs interleaved, up to {rounds} rounds")
        timings = measure_interleaved({name: (lambda s=s: s.run(None, feed)) for name, s in sessions.items()},
                                      warmup=3, repeats=rounds, min_repeats=min(rounds, 10), budget_s=budget_s,
                                      settle=1, gap_s=0.05)
        base = timings[BASELINE]
        rows = []
        for name, t in timings.items():
            per_round = [a / b for a, b in zip(base["times_ms"], t["times_ms"]) if b > 0]
            rows.append({"graph": name, "median_ms": round(t["median_ms"], 2), "p90_ms": round(t["p90_ms"], 2),
                         "spread_p90_over_median": round(t["spread"], 3), "rounds": t["repeats"],
                         "speedup_vs_training": round(ratio_of_rounds(base, t), 3),
                         "speedup_p10_p90": [round(_percentile(per_round, 0.1), 3),
                                             round(_percentile(per_round, 0.9), 3)],
                         "fp32_parity": parity[name], "census": _census(files[name]),
                         "file_bytes": files[name].stat().st_size})
        print("profiling the two exports")
        profiles = {name: op_time_shares(files[name], feed, threads) for name in (BASELINE, DEPLOY)}
        deploy_meta = read_metadata(files[DEPLOY])
    speedup = next(r["speedup_vs_training"] for r in rows if r["graph"] == DEPLOY)
    record = {"benchmark": "deploy_form", "model": "rsdet_atto", "image_size": image_size, "batch": 1,
              "intra_op_num_threads": threads, "seed": seed, "machine": environment(),
              "target_speedup": TARGET_SPEEDUP, "speedup": speedup, "target_met": bool(speedup >= TARGET_SPEEDUP),
              "shortfall": None if speedup >= TARGET_SPEEDUP else round(TARGET_SPEEDUP / speedup, 3),
              "deploy_graph_passes": deploy_meta.get("graph_passes"),
              "deploy_simplified": deploy_meta.get("simplified"),
              "ablation_nodes_rewritten": rewritten, "results": rows, "op_time_shares": profiles}
    write_results(out, "deploy_form_cpu", record, markdown(record))
    return record


def markdown(record: dict) -> str:
    m = record["machine"]
    load = ", ".join(f"{v:.1f}" for v in m.get("load_average_1_5_15") or ())
    flags = " ".join(f for f in m.get("cpu_flags", []) if f.startswith(("avx", "amx", "fma")) or "vnni" in f)
    verdict = (f"target {record['target_speedup']}x met" if record["target_met"] else
               f"target {record['target_speedup']}x NOT met: short by a factor {record['shortfall']}")
    lines = [f"# Deploy-form FP32 export vs training form: ONNX Runtime CPU ({record['model']}, "
             f"{record['image_size']} px, batch 1)", "",
             f"Written by `{m['command']}` on {m['date']}; {m['cpu']}, {m['cores']} cores, flags: {flags or '?'}; "
             f"load average (1/5/15 min, at the end) {load}; onnxruntime {m['versions'].get('onnxruntime')}, "
             f"onnx {m['versions'].get('onnx')}, torch {m['versions'].get('torch')}; "
             f"intra_op_num_threads={record['intra_op_num_threads']}.", "",
             f"**Deploy form: {record['speedup']:.2f}x the training form's speed** ({verdict}). Interleaved rounds "
             f"(each runs every graph once after one untimed run, the order rotating); speed-up = median of the "
             f"per-round ratios training ms / graph ms, with their p10-p90. The machine is shared: spread = p90 / "
             f"median of a graph's own round times.", "",
             "| graph | median ms | p90 ms | spread | speed-up (p10-p90) | fp32 parity | nodes | CastLike | Expand | "
             "SequenceAt | Shape | Transpose | MatMul | Conv | Erf | Gelu |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in record["results"]:
        c = r["census"]
        lines.append(f"| {r['graph']} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | {r['spread_p90_over_median']:.2f} | "
                     f"{r['speedup_vs_training']:.2f}x ({r['speedup_p10_p90'][0]:.2f}-{r['speedup_p10_p90'][1]:.2f}) | "
                     f"{'pass' if r['fp32_parity']['passed'] else 'FAIL'} | {c['nodes']} | {c['CastLike']} | "
                     f"{c['Expand']} | {c['SequenceAt']} | {c['Shape']} | {c['Transpose']} | {c['MatMul']} | "
                     f"{c['Conv']} | {c['Erf']} | {c['Gelu']} |")
    lines += ["", "ORT profiler, share of kernel time per op type (top 12), run one graph after the other:", ""]
    for name, p in record["op_time_shares"].items():
        shares = ", ".join(f"{op} {pct:.1f}%" for op, pct in p["shares_percent"].items())
        lines.append(f"- {name}: {p['kernel_ms_per_inference']:.1f} ms kernel time per inference; {shares}")
    lines += ["", f"Deploy graph passes: {record['deploy_graph_passes']}; onnxslim: {record['deploy_simplified']}."]
    return "\n".join(lines) + "\n"


def deploy_form_suite(config) -> dict:
    """The suite (a :class:`~edgekit.benchmarks.suites.DeployFormSuiteConfig`)."""
    return run(Path(config.out), image_size=config.image_size, rounds=config.rounds, threads=config.threads,
               budget_s=config.budget_s, ablations=config.ablations)
