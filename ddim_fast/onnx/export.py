"""Exporting the eps-model or the whole sampler: the torch export of the network (cached on disk, see
cache.py), the sampler graph around it, the check in ONNX Runtime, the metadata, and the atomic write.

torch.onnx traces only the network, once per (weights, dtype, opset, shape, conditioning inputs): with
its TorchScript exporter first, and torch.export's (dynamo) when that raises or its graph fails the check
against the float64 reference. That is the slow part (seconds; dynamo's took 10-60 s on a CPU), so the
checked network is cached, keyed by content fingerprints; the file's metadata says which exporter made
it. Nothing enters the cache unchecked. `unroll=None` picks unrolled up to UNROLL_MAX_STEPS steps and an
ONNX Loop above (docs/DESIGN.md has the measurement); `table_inputs` makes the plan's table and
timesteps graph inputs, so one file serves every plan of the same structure (graph.structure).
Progress goes to logging.getLogger("ddim_fast") at INFO (silent unless the caller adds a handler).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import time
import warnings
from pathlib import Path

import torch

from .. import __version__
from ..checks import is_int, sample_shape
from ..conditioning import cond_spec, example_cond, resolve
from ..files import atomic_write_bytes, check_creatable
from ..models.diffusers_unet import adapt
from ..plan import COLUMN_MEANINGS, UPDATE_RULE, SamplingPlan
from ..precision import NAMES
from .cache import (  # noqa: F401  (cache_dir, the fingerprints and the limit are part of this module's API)
    CACHE_MAX_MB,
    cache_dir,
    cache_limit_bytes,
    export_estimate_s,
    lookup,
    model_fingerprint,
    plan_fingerprint,
    prune_cache,
    record_export_time,
    store,
)
from .graph import PROTOBUF_LIMIT, layout_key, sampler_proto, structure, table_feeds
from .network import eval_copy, exporters_for, opset_of, torch_export
from .runtime import (
    DamagedOnnxFile,
    OnnxRuntimeMissing,
    OrtRunner,
    first_line,
    one_torch_thread_when_busy,
    read_proto,
)
from .validate import ExportValidationError, check_loop_tables, head, validate_export

# bump when the graph layout changes: part of every cache key. 2: networks from the TorchScript exporter,
# checked against the reference before they enter the cache.
GRAPH_VERSION = 2
EXPORT_DTYPES = {dtype: NAMES[dtype] for dtype in (torch.float32, torch.float16)}  # what ONNX export runs
META_PREFIX = "ddim_fast."
# NOTE: the measurement behind 50 is in docs/DESIGN.md, "Unrolled or Loop: UNROLL_MAX_STEPS".
UNROLL_MAX_STEPS = 50
VALIDATE_LOOP_STEPS = 20  # a Loop export is validated on its first steps plus an exact check of its tables

# Counts of the expensive work, for tests and logs: torch exports of a network, sampler graphs built, cache
# hits, and ONNX Runtime sessions opened for a network (session.py).
stats = {"torch_exports": 0, "sampler_builds": 0, "cache_hits": 0, "sessions": 0}
log = logging.getLogger("ddim_fast")


def _sayer(extra=None):
    """say(line): log `line` at INFO to the "ddim_fast" logger, and pass it to extra(line) when given (the
    deprecated log= argument of export_onnx / export_cached)."""
    def say(line):
        log.info(line)
        if extra is not None:
            extra(line)
    return say


def _export_key(model_fp: str, plan: SamplingPlan | None, dtype, opset, shape, unroll, table=False, cond=None) -> str:
    """The cache key; a table-input graph keys on the plan's structure, not on its table. cond:
    cond_signature() of a conditional export (its inputs, and for a sampler whether guided); None for
    an unconditional one, whose key is unchanged."""
    if plan is None:
        plan_part = None
    elif table:  # an unrolled table graph fixes S; a Loop takes any
        plan_part = layout_key(plan, bool(unroll))
    else:
        plan_part = plan_fingerprint(plan)
    parts = {
        "model": model_fp,
        "plan": plan_part,
        "unroll": unroll if plan is not None else None,
        "dtype": EXPORT_DTYPES[dtype],
        "opset": opset,
        "shape": list(shape),
        "ddim_fast": __version__,
        "graph": GRAPH_VERSION,
        "torch": torch.__version__,
    }
    if table:
        parts["table_inputs"] = True  # added only here: the keys of baked graphs are as before
    if cond is not None:
        parts["cond"] = cond
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _cache_path(key: str, plan: SamplingPlan | None, dtype, table=False, unroll=None) -> Path:
    if plan is None:
        name = f"eps-{EXPORT_DTYPES[dtype]}-{key[:20]}.onnx"
    else:
        layout = ("table-" if table else "") + ("loop" if table and not unroll else f"S{plan.steps}")
        name = f"{plan.direction}-{layout}-{EXPORT_DTYPES[dtype]}-{key[:20]}.onnx"
    return cache_dir() / name



# -- metadata -----------------------------------------------------------------------------------------
def cond_signature(example: dict, guided: bool | None) -> list | None:
    """What an export's graph depends on of its conditioning: each input's name, per-sample shape and
    dtype, and (sampler graphs) whether it is guided. None when the export has no conditioning."""
    if not example:
        return None
    sig = [[k, list(v.shape[1:]), str(v.dtype)] for k, v in example.items()]
    return sig if guided is None else [sig, bool(guided)]


def _cond_metadata(model, example: dict, guided: bool, plan) -> dict:
    """The metadata `conditioning` entry: what to feed, per input (shape, dtype, what null means)."""
    spec = cond_spec(model) or {}
    out = {}
    for k, v in example.items():
        s = spec.get(k, {})
        dims = ", ".join(str(d) for d in v.shape[1:])
        dtype = "float32" if v.is_floating_point() else "int64"
        null = s.get("null")
        out[k] = {"shape": f"(B{', ' + dims if dims else ''})", "dtype": dtype,
                  "null": null, "about": s.get("about", "passed to the model as it is")}
    return out


def _metadata(model, plan, dtype, shape, key, unroll, opset, table=False, cond_example=None, guided=False,
              exporter=None) -> dict:
    cfg = getattr(model, "config", None)
    sched = getattr(model, "schedule", None)
    meta = {
        "version": __version__,
        "kind": "eps_model" if plan is None else "sampler",
        "model_class": type(model).__name__,
        "model_config": cfg.to_dict() if hasattr(cfg, "to_dict") else None,
        "schedule": sched.to_dict() if hasattr(sched, "to_dict") else None,
        "prediction": getattr(model, "prediction", plan.prediction if plan is not None else "eps"),
        "dtype": EXPORT_DTYPES[dtype],
        "shape": list(shape),
        "opset": opset,
        "key": key,
        "exporter": exporter,  # which torch.onnx exporter traced the network: torchscript or dynamo
    }
    cond_meta = _cond_metadata(model, cond_example or {}, guided, plan)
    if cond_meta:
        meta["conditioning"] = cond_meta
        if plan is not None:
            meta["guided"] = bool(guided)
    if plan is None:
        meta["inputs"] = {"x": "(B, C, H, W) float32", "t": "(B,) int64 training timesteps"}
        meta["inputs"].update({k: f"{c['shape']} {c['dtype']}: {c['about']}" for k, c in cond_meta.items()})
        meta["outputs"] = {"prediction": f"(B, C, H, W) float32, the model's {meta['prediction']} prediction"}
    else:
        x_in, x_out = ("x_T", "x0") if plan.direction == "sample" else ("x0", "x_T")
        meta["plan"] = plan.describe()
        meta["graph"] = "unrolled" if unroll else "loop"
        meta["table_inputs"] = bool(table)
        meta["inputs"] = {x_in: "(B, C, H, W) float32"}
        if plan.needs_noise:
            meta["inputs"]["noise"] = (
                "(S, B, C, H, W) float32: z for every step; ONNX has no Philox generator, so the host draws "
                "ddim_fast.rng.step_noise(seed, i, (B, C, H, W), first_index=...) for step i (zeros where sigma=0)"
            )
        if table:
            # any plan with this structure (and, unrolled, these steps) runs here; `plan`: the one validated
            meta["structure"] = structure(plan)
            S = f"S = {plan.steps}" if unroll else "S = their number, any"
            columns = meta["structure"]["columns"]
            meta["inputs"]["coef"] = (f"(S, {plan.coef.shape[1]}) float32: the plan's coefficient table, columns "
                                      f"{' '.join(columns)} (what each is: `columns`, `update`; "
                                      "ddim_fast.onnx.graph.table_feeds(plan) computes it, and export_onnx writes "
                                      "the exported plan's table beside the file as <name>.table.npz)")
            meta["inputs"]["timesteps"] = f"(S,) int64: the plan's timesteps; {S}"
            meta["update"] = UPDATE_RULE
            meta["columns"] = [f"{name}: {COLUMN_MEANINGS[name]}" for name in columns]  # in the table's order
        for k, c in cond_meta.items():
            meta["inputs"][k] = f"{c['shape']} {c['dtype']}: {c['about']}"
        if guided:
            for k, c in cond_meta.items():
                null = f"; the null value {c['null']} gives the model's unconditional branch" \
                    if c["null"] is not None else "; the model has no null value: feed e.g. the empty prompt's states"
                meta["inputs"][f"uncond_{k}"] = f"{c['shape']} {c['dtype']}: the unconditional branch of {k}{null}"
            meta["inputs"]["guidance"] = ("() float32: the guidance scale w, m = m_u + w (m_c - m_u) (0: "
                                          "unconditional, 1: conditional alone)")
        meta["outputs"] = {x_out: "(B, C, H, W) float32, the final state, not clamped"}
    return meta


def _set_metadata(proto, meta: dict):
    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_PREFIX + k, json.dumps(v, sort_keys=True)


def onnx_metadata(path) -> dict:
    """The ddim-fast metadata of an exported file, JSON values decoded (kind, model_config,
    schedule, plan, prediction, dtype, shape, version, ...)."""
    proto = read_proto(path, load_external_data=False)
    meta = {p.key[len(META_PREFIX):]: json.loads(p.value)
            for p in proto.metadata_props if p.key.startswith(META_PREFIX)}
    if not meta:
        raise ValueError(f"{path} has no ddim-fast metadata: it was not written by ddim_fast.export_onnx")
    return meta


# -- export -------------------------------------------------------------------------------------------
def export_onnx(model, path, plan: SamplingPlan | None = None, dtype=torch.float32, opset: int | None = None,
                validate: bool = True, *, shape=None, unroll: bool | None = None, table_inputs: bool = False,
                log=None, guided: bool = False, cond: dict | None = None) -> Path:
    """Export `model` (no plan: the eps-model) or the whole sampler of `plan` to `path` (atomically).

    eps-model:  inputs x (B, C, H, W) float32 and t (B,) int64; output `prediction` float32.
    sampler:    input x_T (x0 for an inversion plan from plan.inverse()), plus `noise`
                (S, B, C, H, W) when the plan draws noise (eta > 0; the host generates it with
                ddim_fast.rng, see the module docstring); output x0 (x_T when inverting), unclamped.
                Clipping and dynamic thresholding are part of the graph.
    dtype:      torch.float32 or torch.float16 (the network's precision; the state stays float32).
    opset:      ONNX opset (default: torch.onnx's); shape: (C, H, W), read from model.config if omitted.
    unroll:     None = unrolled up to UNROLL_MAX_STEPS steps, an ONNX Loop above; True / False force it.
    table_inputs: the table and timesteps are inputs `coef` (S, 6) float32 and `timesteps` (S,)
                int64 (graph.table_feeds(plan)): one file for every plan of the same structure
                (graph.structure: direction, clipping, thresholding, noise), of any S as a Loop,
                of this S unrolled. The metadata says what each column is (`columns`, `update`), and
                `plan`'s own table is written beside the file as <name>.table.npz (write_table), so
                onnxruntime alone can run it.
    validate:   run the graph in ONNX Runtime (CPU) and check it against the float64 reference.
    log:        deprecated: each stage (export, graph, validation) is logged to logging.getLogger("ddim_fast")
                at INFO; a function given here is also called with each line.
    model:      this project's UNet, any nn.Module model(x, t, **cond), or a diffusers UNet2DModel /
                UNet2DConditionModel as it is (its .sample taken; shape from its config).
    A conditional model's inputs (class_labels; encoder_hidden_states of a UNet2DConditionModel) become
    graph inputs of the same names, batch B. cond: example tensors fixing their other dimensions
    (needed for a length other than 77 of encoder_hidden_states; its batch is ignored).
    guided:     (sampler) classifier-free guidance in the graph: inputs uncond_<name> per conditioning
                input and `guidance` (a float32 scalar); each step runs the network on [uncond; cond].
    path:       must end in .onnx, in an existing writable folder (checked before any work).
    Returns the path. The file carries its config, schedule, plan, version and its conditioning
    inputs (names, shapes, dtypes, what null means) in metadata_props (read them with onnx_metadata).
    """
    path = check_onnx_path(path)  # before any work
    job = _prepare(model, plan, dtype, opset, shape, unroll, table_inputs, guided, cond)
    written = _write(path, _build(job, validate, _sayer(log)))
    if job.table:
        write_table(table_path(path), job.plan)
    return written


def check_onnx_path(path) -> Path:
    """The output of an export: a file name ending in .onnx whose folder exists and is writable (the rules
    and words of export_onnx and of `ddim-fast export --out` alike)."""
    path = Path(path)
    if path.suffix.lower() != ".onnx":
        raise ValueError(f"the output must name an .onnx file, got {path}: give a path ending in .onnx, "
                         f"e.g. {path.with_suffix('.onnx').name if path.stem else 'model.onnx'}")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name such as {path / 'model.onnx'}")
    return check_creatable(path)


def table_path(path) -> Path:
    """Where export_onnx writes the table of a table-input graph's plan: <name>.table.npz beside <name>.onnx."""
    path = Path(path)
    return path.with_name(f"{path.stem}.table.npz")


def write_table(path, plan: SamplingPlan) -> Path:
    """The feeds of a table-input graph for `plan` as an .npz that plain numpy reads (atomically): `coef`
    (S, columns) float32, `timesteps` (S,) int64, `columns` (their names) and `plan` (plan.describe() as
    JSON). With them, onnxruntime runs the graph without ddim_fast (docs/onnx.md)."""
    import numpy as np

    feeds = table_feeds(plan)
    columns = structure(plan)["columns"]
    buf = io.BytesIO()
    np.savez(buf, coef=feeds["coef"].numpy().astype(np.float32), timesteps=feeds["timesteps"].numpy().astype(np.int64),
             columns=np.array(columns), plan=np.array(json.dumps(plan.describe())))
    return atomic_write_bytes(path, buf.getvalue())


def cond_example(model, cond=None) -> dict:
    """Example conditioning inputs (batch 2) for the export of `model`: from `cond` (checked) when given,
    else from the model's cond_spec (encoder_hidden_states of length 77, CLIP's); {} when unconditional."""
    spec = cond_spec(model)
    if cond is not None:
        if not isinstance(cond, dict) or not cond or not all(isinstance(v, torch.Tensor) and v.ndim >= 1
                                                             for v in cond.values()):
            raise ValueError("cond must be a dict of example tensors with a leading batch dimension, "
                             "e.g. {'encoder_hidden_states': torch.zeros(1, 77, 768)}")
        batch = next(iter(cond.values())).shape[0]
        checked = resolve(model, batch, cond, spec=spec).cond
        return {k: v[:1].expand(2, *v.shape[1:]).clone().cpu() for k, v in checked.items()}
    if not spec:
        return {}
    return example_cond(spec, 2, torch.Generator().manual_seed(0), length=77)


def _check_args(model, plan, dtype, opset, shape, unroll, table=False):
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"export_onnx takes a torch.nn.Module model(x, t), got {type(model).__name__}")
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"ONNX export supports dtype torch.float32 or torch.float16, got {dtype}; "
                         "for bfloat16 use the reference, triton or cuda_graph backend")
    check_opset(opset)
    if plan is not None and not isinstance(plan, SamplingPlan):
        raise ValueError(f"plan must be a SamplingPlan or None (eps-model only), got {type(plan).__name__}")
    if plan is not None:
        pred = getattr(model, "prediction", plan.prediction)
        if pred != plan.prediction:
            raise ValueError(f"the model predicts {pred!r} but the plan was built for {plan.prediction!r}: "
                             f"build the plan with prediction={pred!r}")
    if unroll not in (None, True, False):
        raise ValueError(f"unroll must be None (automatic), True or False, got {unroll!r}")
    if table not in (True, False):
        raise ValueError(f"table_inputs must be True or False, got {table!r}")
    if table and plan is None:
        raise ValueError("table_inputs=True needs a plan: the table belongs to a sampler graph, not the eps-model")
    return sample_shape(model, shape)


def check_opset(opset) -> None:
    if opset is not None and (not is_int(opset) or not 18 <= opset <= 23):
        raise ValueError(f"opset must be an int in [18, 23] (torch.onnx writes opset 18 or newer), got {opset!r}")


@dataclasses.dataclass(frozen=True)
class _Job:
    """One export's checked inputs (from _prepare): what _build makes, and what keys it in the cache."""

    model: torch.nn.Module
    plan: SamplingPlan | None
    dtype: torch.dtype
    opset: int | None
    shape: tuple
    unroll: bool | None
    table: bool
    guided: bool
    example: dict  # conditioning inputs (cond_example), {} for an unconditional model
    model_fp: str

    @property
    def key(self) -> str:
        sig = cond_signature(self.example, None if self.plan is None else self.guided)
        return _export_key(self.model_fp, self.plan, self.dtype, self.opset, self.shape, self.unroll, self.table, sig)

    @property
    def path(self) -> Path:
        return _cache_path(self.key, self.plan, self.dtype, self.table, self.unroll)

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def network(self) -> _Job:
        """The export of this job's network alone (the eps-model), which its sampler graph is built around."""
        return dataclasses.replace(self, plan=None, unroll=None, table=False, guided=False)


def _prepare(model, plan, dtype, opset, shape, unroll, table=False, guided=False, cond=None, model_fp=None) -> _Job:
    """Check an export's arguments once and resolve what they leave open (the layout, the conditioning)."""
    model = adapt(model)
    shape = _check_args(model, plan, dtype, opset, shape, unroll, table)
    example = cond_example(model, cond)
    return _Job(model, plan, dtype, opset, shape, _resolve_unroll(plan, unroll), table,
                _check_guided(guided, plan, example), example, model_fp or network_fingerprint(model))


def _build(job: _Job, validate: bool, say):
    """The job's graph with its metadata, validated when asked; say(line) at each stage."""
    model, plan, dtype, shape, unroll, table, guided = (job.model, job.plan, job.dtype, job.shape, job.unroll,
                                                         job.table, job.guided)
    net_proto = _network(job.network(), say, validate)  # checked when it was exported (unless validate=False)
    exporter = _meta_of(net_proto).get("exporter")
    if plan is None:
        _set_metadata(net_proto, _metadata(model, None, dtype, shape, job.key, None, opset_of(net_proto), False,
                                           job.example, exporter=exporter))
        return net_proto
    say(f"building the {plan.steps}-step sampler graph ({'unrolled' if unroll else 'one ONNX Loop'}"
        f"{'; the table and timesteps are inputs' if table else ''}"
        f"{', classifier-free guidance' if guided else ''})")
    proto = _sampler(net_proto, plan, unroll, shape, table, guided)
    if validate:
        say("validating the sampler graph in ONNX Runtime against the float64 reference")
    _set_metadata(proto, _metadata(model, plan, dtype, shape, job.key, unroll, opset_of(proto), table, job.example,
                                   guided, exporter=exporter))
    checked = {"cond": job.example, "guided": guided}
    if validate and table and not unroll:
        # the Loop is the same for every plan of this structure: checked on the first steps of this one
        validate_export(proto, model, head(plan, min(plan.steps, VALIDATE_LOOP_STEPS)), dtype, shape, **checked)
    elif validate and not unroll and plan.steps > VALIDATE_LOOP_STEPS:
        # A Loop runs one body S times, reading row i of its tables: validating the body on the
        # first steps and the tables exactly costs VALIDATE_LOOP_STEPS reference steps, not S
        # (a float64 DDPM-1000 reference of the CIFAR-10 UNet took 20 minutes on 2 CPU cores).
        first = head(plan, VALIDATE_LOOP_STEPS)
        validate_export(_sampler(net_proto, first, False, shape, False, guided), model, first, dtype, shape, **checked)
        check_loop_tables(proto, plan)
    elif validate:
        validate_export(proto, model, plan, dtype, shape, **checked)
    return proto


def _meta_of(proto) -> dict:
    return {p.key[len(META_PREFIX):]: json.loads(p.value) for p in proto.metadata_props
            if p.key.startswith(META_PREFIX)}


def _check_guided(guided, plan, example):
    if guided not in (True, False):
        raise ValueError(f"guided must be True or False, got {guided!r}")
    if guided and plan is None:
        raise ValueError("guided applies to a sampler export (give plan=); the eps-model graph takes cond as inputs")
    if guided and not example:
        raise ValueError("guided=True needs a conditional model (class labels or encoder_hidden_states); "
                         "this one takes no conditioning")
    return guided


def _resolve_unroll(plan, unroll):
    if plan is None:
        return None
    return plan.steps <= UNROLL_MAX_STEPS if unroll is None else unroll


def _sampler(net_proto, plan, unroll, shape, table=False, guided=False):
    """graph.sampler_proto, counted in stats."""
    proto = sampler_proto(net_proto, plan, unroll, shape, table, guided)
    stats["sampler_builds"] += 1
    return proto


def _network(job: _Job, say, validate: bool = True):
    """The eps-model graph of a network job: from the cache when it was exported before (a damaged entry is
    exported again), else exported now and, when validated, cached."""
    path = lookup(job.path)
    if path is not None:
        try:
            proto = read_proto(path)
            stats["cache_hits"] += 1
            return proto
        except DamagedOnnxFile as e:
            discard_damaged(e)
    proto, _, data = export_network(job, say, validate)
    if validate:  # only a checked network enters the cache: the CPU backend runs it as it is
        store(job.path, data)
    return proto


def discard_damaged(err: DamagedOnnxFile):
    """Remove a damaged cache entry, saying so once, before it is exported again."""
    warnings.warn(f"re-exporting the damaged cache entry {err.path} ({err})", stacklevel=3)
    err.path.unlink(missing_ok=True)


EXPORTER_NAMES = {"torchscript": "TorchScript", "dynamo": "dynamo (torch.export)"}


def export_network(job: _Job, say=None, validate: bool = True, threads: int | None = None):
    """(proto, runner, data): the network of `job` traced by torch.onnx, its exporters tried in order
    (network.exporters_for: TorchScript, then dynamo when TorchScript raises or its graph fails the check),
    with its metadata (which exporter made it). validate: check it in ONNX Runtime against the float64
    reference (validate.validate_export) in a CPU session of `threads`, returned as `runner` for reuse (None
    without validation), and `data`, the proto serialized once (a 143 MB graph takes 0.3 s to serialize: the
    session and the cache share it). Records the seconds of a TorchScript export and its check in timings.json."""
    say = say or _sayer()
    errors = []
    exporters = exporters_for(job.opset)
    for exporter in exporters:
        say(f"exporting the network with torch.onnx's {EXPORTER_NAMES[exporter]} exporter ({EXPORT_DTYPES[job.dtype]}, "
            f"{job.params / 1e6:.1f}M parameters; once per model, then cached"
            + (f"; about {export_estimate_s(job.params):.0f} s here)" if exporter == "torchscript" else ")"))
        t0 = time.perf_counter()
        private = eval_copy(job.model, job.dtype)  # traced, then the check's reference (made float64 there)
        try:
            with one_torch_thread_when_busy():  # the trace runs the network
                proto = torch_export(job.model, job.dtype, job.opset, job.shape, job.example, exporter, copy=private)
        except OnnxRuntimeMissing:
            raise
        except ValueError as e:
            errors.append(e)
            say(f"the {EXPORTER_NAMES[exporter]} exporter failed: {first_line(e)}")
            continue
        stats["torch_exports"] += 1
        _set_metadata(proto, _metadata(job.model, None, job.dtype, job.shape, job.key, None, opset_of(proto), False,
                                       job.example, exporter=exporter))
        runner, data = None, _serialized(proto)
        if validate:
            say("checking the network in ONNX Runtime against the float64 reference")
            runner = OrtRunner(data, device="cpu", threads=threads)
            try:
                with one_torch_thread_when_busy():  # the float32 and float64 references
                    validate_export(proto, job.model, None, job.dtype, job.shape, cond=job.example, runner=runner,
                                    own_copy=private)
            except ExportValidationError as e:
                errors.append(e)
                say(f"the {EXPORTER_NAMES[exporter]} exporter's graph failed the check: {first_line(e)}")
                continue
        seconds = time.perf_counter() - t0
        if validate:
            record_export_time(seconds, job.params, exporter)
        say(f"exported the network with the {EXPORTER_NAMES[exporter]} exporter in {seconds:.1f} s")
        return proto, runner, data
    if len(errors) == 1:
        raise errors[0]
    detail = "; ".join(f"{EXPORTER_NAMES[x]}: {first_line(e)}" for x, e in zip(exporters, errors))
    kind = ExportValidationError if isinstance(errors[-1], ExportValidationError) else ValueError
    raise kind(f"neither torch.onnx exporter gave a usable graph of {type(job.model).__name__} ({detail})") \
        from errors[-1]


def network_job(model, dtype=torch.float32, opset: int | None = None, *, shape=None, cond: dict | None = None,
                model_fp: str | None = None) -> _Job:
    """The checked export job of a network (the eps-model): its cache key and path."""
    return _prepare(model, None, dtype, opset, shape, None, cond=cond, model_fp=model_fp)


def network_file(job: _Job, threads: int | None = None):
    """(path, runner) of a network job's file in the cache: found (runner None), or exported and checked
    now (runner: the CPU session the check ran in, `threads` intra-op threads, ready to use)."""
    path = lookup(job.path)
    if path is not None:
        stats["cache_hits"] += 1
        return path, None
    _, runner, data = export_network(job, None, True, threads)
    return store(job.path, data), runner


def network_fingerprint(model) -> str:
    """model_fingerprint of the network as it is exported (float32, on the CPU), without copying a model
    that is already so."""
    model = adapt(model)
    tensors = [*model.parameters(), *model.buffers()]
    plain = all(t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point()) for t in tensors)
    return model_fingerprint(model if plain else eval_copy(model, torch.float32))


def network_cached(model, dtype=torch.float32, opset: int | None = None, *, shape=None,
                   model_fp: str | None = None) -> bool:
    """Whether the checked torch export of this (model, dtype, opset, shape) is in the cache: if so, an
    onnxruntime Engine opens a session on it (a second or less); if not, the export costs export_estimate_s()."""
    model_fp = model_fp or network_fingerprint(model)
    return lookup(network_job(model, dtype, opset, shape=shape, model_fp=model_fp).path) is not None


def _serialized(proto) -> bytes:
    from google.protobuf.message import EncodeError

    try:
        return proto.SerializeToString()
    except EncodeError:  # protobuf says only "Failed to serialize proto"; its ByteSize() fails the same way
        size = _tensor_bytes(proto.graph)
        if size < PROTOBUF_LIMIT:
            raise
    raise ValueError(f"the graph holds {size / 2**30:.1f} GiB of tensors, over protobuf's 2 GiB limit for one file; "
                     "export the eps-model, or use fewer steps with unroll=False")


def _tensor_bytes(g) -> int:
    """The bytes of the initializers of graph g and of its subgraphs (a Loop's body)."""
    own = sum(len(t.raw_data) for t in g.initializer)
    return own + sum(_tensor_bytes(sub) for node in g.node for a in node.attribute
                     for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs))


def _write(path, proto) -> Path:
    path = check_onnx_path(path)  # again: the folder may have gone while the graph was built
    return atomic_write_bytes(path, _serialized(proto))


def export_cached(model, plan: SamplingPlan | None = None, dtype=torch.float32, opset: int | None = None, *,
                  shape=None, unroll: bool | None = None, table_inputs: bool = False, model_fp: str | None = None,
                  log=None, guided: bool = False, cond: dict | None = None) -> Path:
    """export_onnx into the cache folder (cache_dir()), keyed by a content hash of the weights, config,
    plan (its structure only, with table_inputs), dtype, opset and ddim-fast version: a second call with
    the same inputs returns the file without exporting. model_fp: model_fingerprint(model), when the
    caller already has it; log: deprecated (the stages go to logging.getLogger("ddim_fast"))."""
    job = _prepare(model, plan, dtype, opset, shape, unroll, table_inputs, guided, cond, model_fp)
    found = lookup(job.path)
    if found is not None:
        stats["cache_hits"] += 1
        return found
    return store(job.path, _serialized(_build(job, True, _sayer(log))))
