"""The sampler written in ONNX around the exported network: the ONNX statement of the update.

One step is the plan's update (*) of plan.py,

    x' = d0 * clip(cx * x + ce * m) + dx * x + de * m + sigma * z,

with `clip` the identity, a fixed range (Clip) or Imagen's dynamic thresholding (TopK quantile),
written once in `step_ops` (the operations and their order are those of ddim_fast.sampling.step).
Two layouts of the S steps are built from the same network graph:
  unrolled   S copies of the network nodes, sharing one set of weights, each step's coefficients
             and timestep as constants (ORT can fold and plan every step);
  loop       one ONNX Loop whose body is the network plus the step, reading its row of the (S, 6)
             coefficient table and its timestep by the iteration number (graph size independent of S).
A multistep plan (plms, dpmpp_*, unipc) adds the history terms of (**) and the push to the same
statement; its K history tensors are S-step values in the unrolled layout and Loop-carried state
(beside x, starting at zeros) in the Loop layout, with its wider (S, 13) table.
Either layout can take the table and timesteps as graph inputs instead of constants (`table_inputs`:
`coef` (S, columns) float32, `timesteps` (S,) int64; the host feeds table_feeds(plan), the same
float32 numbers a baked graph holds). One graph then serves every plan of the same structure
(structure(): direction, sampler and its options, clipping, thresholding, noise): whatever its
spacing or eta, and for a Loop (whose trip count is the length of `timesteps`) whatever its steps;
an unrolled graph fixes S (and, for a multistep plan, which steps push: layout_key()).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import __version__
from ..plan import ALL_COLUMNS, COEF_COLUMNS, COL, HISTORY_WEIGHTS, SamplingPlan
from .runtime import import_onnx


class Builder:
    """Collects nodes and initializers with unique names under a prefix."""

    def __init__(self, prefix="ddim/"):
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.prefix = prefix
        self.nodes, self.inits = [], []
        self.n = 0

    def name(self, hint):
        self.n += 1
        return f"{self.prefix}{hint}_{self.n}"

    def const(self, value, dtype=np.float32, hint="c"):
        name = self.name(hint)
        self.inits.append(self.numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type, inputs, hint=None, n_out=1, **attrs):
        outs = [self.name(hint or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(self.helper.make_node(op_type, list(inputs), outs, name=self.name(op_type), **attrs))
        return outs[0] if n_out == 1 else outs


def step_ops(b: Builder, plan: SamplingPlan, x: str, m: str, c: dict, z: str | None, numel: int,
             hist: list | None = None):
    """Append one update (*) to `b`; c maps column names to scalar tensors. Returns the new state.
    The operations and their order are those of ddim_fast.sampling.step (same float32 rounding).
    With `hist` (a multistep plan's history names [H1, ...]): (**), returns (new state, new history);
    c["push"] is then a bool (known when unrolled) or a scalar tensor (Loop)."""
    x0 = b.op("Add", [b.op("Mul", [c["cx"], x]), b.op("Mul", [c["ce"], m])], "x0")  # (1) predicted x0
    if plan.threshold is not None:
        x0 = threshold_ops(b, x0, plan.threshold, plan.threshold_max, numel)
    elif plan.clip_x0 is not None:
        lo, hi = plan.clip_x0
        x0 = b.op("Clip", [x0, b.const(lo), b.const(hi)], "x0_clip")
    # (2) sqrt(a') x0 + (3) the direction pointing to x_t, as coefficients of x0, x and m
    out = b.op("Add", [b.op("Mul", [c["d0"], x0]), b.op("Mul", [c["dx"], x])])
    out = b.op("Add", [out, b.op("Mul", [c["de"], m])], "x_mean")
    if hist:  # (**) the history terms, then the push (P from the step's input x)
        for name, H in zip(HISTORY_WEIGHTS, hist):
            out = b.op("Add", [out, b.op("Mul", [c[name], H])], f"x_{name}")
        push = c["push"]
        if push is not False:
            p = b.op("Add", [b.op("Add", [b.op("Mul", [c["pu"], x0]), b.op("Mul", [c["pv"], x])]),
                             b.op("Mul", [c["pw"], m])], "push")
            shifted = [p] + hist[:-1]
            if push is True:
                hist = shifted
            else:
                on = b.op("Not", [b.op("Equal", [push, b.const(0.0)])], "push_on")
                hist = [b.op("Where", [on, new, old], f"h{k + 1}_next")
                        for k, (new, old) in enumerate(zip(shifted, hist))]
    if z is not None:
        out = b.op("Add", [out, b.op("Mul", [c["sigma"], z])], "x_next")  # (4) sigma_t z
    return out if hist is None else (out, hist)


def threshold_ops(b: Builder, x0: str, p: float, s_max: float, numel: int) -> str:
    """Dynamic thresholding as ddim_fast.sampling.dynamic_threshold: s = quantile(|x0|, p) per sample
    (torch's linear interpolation between order statistics), clamped to [1, s_max]; x0 = clip(x0, -s, s) / s.
    Only the top order statistics are needed, so TopK(largest) replaces a full sort."""
    rank = float(np.float32(p) * np.float32(numel - 1))  # torch computes the rank in float32
    below = int(math.floor(rank))
    above = min(below + 1, numel - 1)
    frac = np.float32(rank - below)
    k = numel - below  # the k largest hold order statistics below..numel-1, descending
    flat = b.op("Reshape", [b.op("Abs", [x0]), b.const([0, -1], np.int64)], "abs_flat")  # (B, N)
    top = b.op("TopK", [flat, b.const([k], np.int64)], "top", n_out=2, axis=1, largest=1, sorted=1)[0]  # (B, k)
    v_lo = b.op("Gather", [top, b.const(k - 1, np.int64)], "q_lo", axis=1)  # (B,) order statistic `below`
    s = v_lo
    if frac != 0 and above != below:
        v_hi = b.op("Gather", [top, b.const(k - 1 - (above - below), np.int64)], "q_hi", axis=1)
        s = b.op("Add", [v_lo, b.op("Mul", [b.const(frac), b.op("Sub", [v_hi, v_lo])])], "q")
    s = b.op("Max", [s, b.const(1.0)], "s")
    if math.isfinite(s_max):
        s = b.op("Min", [s, b.const(s_max)], "s")
    s = b.op("Reshape", [s, b.const([-1, 1, 1, 1], np.int64)], "s4")  # (B, 1, 1, 1)
    clipped = b.op("Max", [b.op("Min", [x0, s]), b.op("Neg", [s])])
    return b.op("Div", [clipped, s], "x0_thr")


def network_parts(net_proto):
    """(nodes, initializers, x name, t name, output name) of an exported eps-model graph (its
    conditioning inputs after x and t: network_cond_inputs)."""
    g = net_proto.graph
    if [i.name for i in g.input][:2] != ["x", "t"] or len(g.output) != 1:
        raise ValueError("not a ddim-fast eps-model graph (inputs x, t, conditioning; one output): re-export it")
    for node in g.node:
        if any(a.type in (a.GRAPH, a.GRAPHS) for a in node.attribute):
            raise ValueError(f"the network graph has a control-flow node ({node.op_type}); "
                             "the sampler export supports feed-forward networks only")
    return list(g.node), list(g.initializer), "x", "t", g.output[0].name


def network_cond_inputs(net_proto) -> list:
    """The conditioning inputs of an exported network (after x and t), as ValueInfoProtos."""
    return list(net_proto.graph.input)[2:]


def _batched(helper, info, name, batch="B"):
    """A value info like `info` (a network input) named `name`, its first dimension the batch `batch`."""
    tt = info.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim]
    return helper.make_tensor_value_info(name, tt.elem_type, [batch, *dims[1:]])


def guided_ops(b: Builder, m2: str, w: str) -> str:
    """Classifier-free guidance: m = m_u + w (m_c - m_u) from the doubled batch's output m2 = [m_u; m_c]
    (the operations and order of ddim_fast.conditioning.combine)."""
    m_u, m_c = b.op("Split", [m2], "m_half", n_out=2, axis=0, num_outputs=2)
    return b.op("Add", [m_u, b.op("Mul", [w, b.op("Sub", [m_c, m_u])])], "m_cfg")


def copy_nodes(nodes, rename, prefix):
    """Copies of `nodes` with every value not in `rename` (weights, constants kept) prefixed."""
    out = []
    for node in nodes:
        n = type(node)()
        n.CopyFrom(node)
        del n.input[:]
        del n.output[:]
        n.input.extend(rename.get(v, prefix + v) if v else v for v in node.input)
        n.output.extend(rename.get(v, prefix + v) if v else v for v in node.output)
        n.name = prefix + (node.name or node.op_type)
        n.doc_string = ""
        del n.metadata_props[:]  # the exporter's per-node stack traces: ~1 KB per node, per copy
        out.append(n)
    return out


# What a table-input graph does not depend on: only the table's values and length change with these.
TABLE_ONLY = ("T", "steps", "timesteps", "eta", "variance", "spacing", "eps_at", "final_alpha",
              "tuned")  # tuned: ddim_fast/tune.py's record of how the table was fitted (its values only)


def structure(plan: SamplingPlan) -> dict:
    """What a table-input sampler graph depends on: the plan's record without the fields that only
    change the table's values (TABLE_ONLY), plus whether it takes noise. Every other field, including
    any added later, keeps two plans apart, so a graph is never reused for a plan it cannot run."""
    out = {k: v for k, v in plan.describe().items() if k not in TABLE_ONLY}
    out["needs_noise"] = plan.needs_noise
    out["columns"] = list(ALL_COLUMNS[: plan.coef.shape[1]])
    return out


def layout_key(plan: SamplingPlan, unrolled: bool) -> dict:
    """What a table-input graph of this layout depends on: structure(), and for an unrolled graph its
    steps and (multistep) which steps push their estimate, since those are built into it."""
    key = {**structure(plan), "steps": None, "push": None}
    if unrolled:
        key["steps"] = plan.steps
        if plan.history:
            key["push"] = [bool(v) for v in plan.column("push").tolist()]
    return key


def table_feeds(plan: SamplingPlan) -> dict:
    """The `coef` and `timesteps` inputs of a table-input graph for `plan`: its table rounded once to
    float32 (as the reference and a baked graph use it) and its timesteps."""
    return {"coef": plan.to("cpu", torch.float32).coef.contiguous(), "timesteps": plan.timesteps.to("cpu")}


def sampler_proto(net_proto, plan: SamplingPlan, unroll: bool, shape, table_inputs: bool = False,
                  guided: bool = False):
    """The whole sampler as an onnx.ModelProto, built around the exported network. table_inputs: the
    table and timesteps are graph inputs instead of constants; `plan` gives the structure (layout_key).

    A network with conditioning inputs (e.g. class_labels) makes them sampler inputs of the same
    names with batch B; guided adds `uncond_<name>` for each and `guidance` (a float32 scalar): every
    step then runs the network once on [uncond; cond] (2B) and combines m = m_u + w (m_c - m_u)."""
    onnx = import_onnx()
    from onnx import TensorProto, helper

    nodes, weights, _, _, pred = network_parts(net_proto)
    cond_infos = network_cond_inputs(net_proto)
    names = [i.name for i in cond_infos]
    if guided and not names:
        raise ValueError("a guided sampler needs a network with conditioning inputs (this one takes x and t only)")
    keep = {w.name for w in weights} | {""}
    x_in, x_out = ("x_T", "x0") if plan.direction == "sample" else ("x0", "x_T")
    noise = plan.needs_noise
    C, H, W = shape
    numel = C * H * W
    p32 = plan.to("cpu", torch.float32)
    coef = p32.coef.numpy()  # (S, 6): rounded once to float32, as the reference does
    ts = plan.timesteps.numpy().astype(np.int64)  # (S,)

    b = Builder()
    batch = b.op("Shape", [x_in], "batch", start=0, end=1)  # (1,) int64
    state_type = helper.make_tensor_type_proto(TensorProto.FLOAT, ["B", C, H, W])
    net_cond = {n: n for n in names}  # the network's conditioning inputs: the graph's own, or doubled
    net_batch = batch
    if guided:
        net_cond = {n: b.op("Concat", [f"uncond_{n}", n], f"cond2_{n}", axis=0) for n in names}  # [uncond; cond]
        net_batch = b.op("Mul", [batch, b.const([2], np.int64)], "batch2")  # (1,) 2B

    def net_state(bld, x):
        """The network's input state: x, or [x; x] for the doubled batch."""
        return bld.op("Concat", [x, x], "x2", axis=0) if guided else x

    def formed(bld, m):
        """The model output the update uses: m, or the guidance combine of the doubled output."""
        return guided_ops(bld, m, "guidance") if guided else m

    K = plan.history
    columns = COEF_COLUMNS + HISTORY_WEIGHTS[:K] + ("pu", "pv", "pw") if K else COEF_COLUMNS  # what step_ops reads
    if unroll:
        x = x_in
        hist = [b.op("ConstantOfShape", [b.op("Shape", [x_in], "state_shape")], "h0")] * K if K else None
        for i in range(plan.steps):
            pre = f"s{i}/"
            if table_inputs:  # step i's timestep and row read from the inputs
                t_i = b.op("Gather", ["timesteps", b.const([i], np.int64)], f"{pre}t_i", axis=0)  # (1,)
                row = b.op("Gather", ["coef", b.const(i, np.int64)], f"{pre}row", axis=0)  # (columns,)
            else:
                t_i = b.const([ts[i]], np.int64, f"t{i}")
            t = b.op("Expand", [t_i, net_batch], f"{pre}t")  # (B,) or (2B,)
            rename = {"x": net_state(b, x), "t": t, **net_cond, **{k: k for k in keep}}
            b.nodes.extend(copy_nodes(nodes, rename, pre))
            m = formed(b, pre + pred)  # (B, C, H, W) the model output at step i
            z = None
            if noise and (table_inputs or coef[i, COL["sigma"]] != 0):  # a fed table's sigma may be nonzero at any step
                z = b.op("Gather", ["noise", b.const(i, np.int64)], f"{pre}z", axis=0)  # (B, C, H, W)
            # sigma only where the step adds noise: an initializer no node reads makes plain onnxruntime
            # warn "Removing initializer ... not used" on every load
            if table_inputs:
                c = {name: b.op("Gather", [row, b.const(COL[name], np.int64)], f"{pre}{name}", axis=0)
                     for name in columns if name != "sigma" or z is not None}
            else:
                c = {name: b.const(coef[i, COL[name]], hint=f"{pre}{name}") for name in columns
                     if name != "sigma" or z is not None}
            if K:  # whether step i pushes is part of an unrolled graph (layout_key keys on it)
                c["push"] = bool(coef[i, COL["push"]] != 0)
                x, hist = step_ops(b, plan, x, m, c, z, numel, hist)
            else:
                x = step_ops(b, plan, x, m, c, z, numel)
        b.nodes.append(helper.make_node("Identity", [x], [x_out], name="ddim/out"))
    else:
        # The Loop body reads the weights, the tables, `batch` and `noise` from the outer scope.
        if table_inputs:
            table, steps_t = "coef", "timesteps"  # graph inputs: (S, 6) float32, (S,) int64
        else:
            table = b.const(coef, hint="coef_table")  # (S, 6)
            steps_t = b.const(ts, np.int64, "timesteps")  # (S,)
        body = Builder("ddim/body/")
        i, cond, x = "ddim/body/i", "ddim/body/cond", "ddim/body/x"
        t_i = body.op("Gather", [steps_t, i], "t_i", axis=0)  # () int64
        t = body.op("Expand", [body.op("Unsqueeze", [t_i, body.const([0], np.int64)]), net_batch], "t")  # (B,)
        row = body.op("Gather", [table, i], "row", axis=0)  # (6,)
        c = {name: body.op("Gather", [row, body.const(COL[name], np.int64)], name, axis=0)
             for name in columns + (("push",) if K else ())}
        rename = {"x": net_state(body, x), "t": t, **net_cond, **{k: k for k in keep}}
        body.nodes.extend(copy_nodes(nodes, rename, "ddim/body/net/"))
        z = body.op("Gather", ["noise", i], "z", axis=0) if noise else None  # (B, C, H, W)
        m = formed(body, "ddim/body/net/" + pred)
        h_in = [f"ddim/body/h{k + 1}" for k in range(K)]  # the history, carried beside x
        if K:
            x_next, h_next = step_ops(body, plan, x, m, c, z, numel, h_in)
            h_next = [body.op("Identity", [h], f"h{k + 1}_out") for k, h in enumerate(h_next)]
        else:
            x_next, h_next = step_ops(body, plan, x, m, c, z, numel), []
        cond_out = body.op("Identity", [cond], "cond_out")
        x_next = body.op("Identity", [x_next], "x_out")
        body_graph = helper.make_graph(
            body.nodes, "ddim_step",
            [helper.make_tensor_value_info(i, TensorProto.INT64, []),
             helper.make_tensor_value_info(cond, TensorProto.BOOL, []),
             helper.make_value_info(x, state_type)] + [helper.make_value_info(h, state_type) for h in h_in],
            [helper.make_tensor_value_info(cond_out, TensorProto.BOOL, []),
             helper.make_value_info(x_next, state_type)] + [helper.make_value_info(h, state_type) for h in h_next],
            initializer=body.inits,
        )
        if table_inputs:  # as many iterations as timesteps were fed
            trips = b.op("Squeeze", [b.op("Shape", [steps_t], "S", start=0, end=1), b.const([0], np.int64)], "trips")
        else:
            trips = b.const(plan.steps, np.int64, "trips")
        h0 = [b.op("ConstantOfShape", [b.op("Shape", [x_in], "state_shape")], "h0")] * K
        h_final = [f"ddim/h{k + 1}_final" for k in range(K)]  # the last history: unused
        b.nodes.append(helper.make_node("Loop", [trips, "", x_in, *h0], [x_out, *h_final], name="ddim/loop",
                                        body=body_graph))

    inputs = [helper.make_value_info(x_in, state_type)]
    S = "S" if table_inputs and not unroll else plan.steps  # an unrolled graph has S fixed
    if noise:
        inputs.append(helper.make_tensor_value_info("noise", TensorProto.FLOAT, [S, "B", C, H, W]))
    if table_inputs:
        inputs.append(helper.make_tensor_value_info("coef", TensorProto.FLOAT, [S, coef.shape[1]]))
        inputs.append(helper.make_tensor_value_info("timesteps", TensorProto.INT64, [S]))
    inputs += [_batched(helper, info, info.name) for info in cond_infos]
    if guided:
        inputs += [_batched(helper, info, f"uncond_{info.name}") for info in cond_infos]
        inputs.append(helper.make_tensor_value_info("guidance", TensorProto.FLOAT, []))
    graph = helper.make_graph(b.nodes, f"ddim_{plan.direction}_{S}", inputs,
                              [helper.make_value_info(x_out, state_type)], initializer=weights + b.inits)
    model = helper.make_model(graph, opset_imports=list(net_proto.opset_import), producer_name="ddim-fast",
                              producer_version=__version__)
    model.ir_version = net_proto.ir_version
    model.functions.extend(net_proto.functions)
    if _serializable(model):  # the checker needs one in-memory message
        onnx.checker.check_model(model)
    return model


PROTOBUF_LIMIT = 2**31 - 1  # bytes in one serialized protobuf message


def _serializable(model) -> bool:
    """Whether `model` fits one protobuf message (over 2 GiB, ByteSize() itself raises; export says why)."""
    from google.protobuf.message import EncodeError

    try:
        return model.ByteSize() < PROTOBUF_LIMIT
    except EncodeError:
        return False
