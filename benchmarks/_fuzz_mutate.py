"""The fuzzer's mutations: each takes a seed's files and a ``random.Random`` and returns new files and what it did.

Three families:

- bytes: truncation at a random point, bit flips, byte overwrites, an inserted or deleted run of bytes (on the
  model file or, for a model with external data, its ``.data`` file);
- ONNX fields, edited on the parsed ``ModelProto`` then serialized: op_type, domain, opset version, ir_version,
  dims, data_type, attribute values and types, input/output names made dangling or duplicate, external-data
  location / offset / length, nodes and initializers removed or duplicated, tensor payloads cut short;
- zip members of a ``.pt2`` / ``torch.save`` archive: a member truncated, bit-flipped, replaced, removed, added
  (an AOTInductor or pickled-object member), or a JSON value of the program changed.

A mutant is one to three edits drawn from its own seed, so ``Mutant.replay(edits)`` rebuilds it from any subset
of them (what the fuzzer's minimizer uses).
"""

from __future__ import annotations

import io
import json
import random
import warnings
import zipfile
from dataclasses import dataclass, field

from graphopt.ir.onnx_checks import graphs

OPS = ["Relu", "Add", "Conv", "MatMul", "Gemm", "Reshape", "Shape", "Gather", "Concat", "BatchNormalization",
       "Identity", "Dropout", "If", "Loop", "Cast", "QuantizeLinear", "DequantizeLinear", "Softmax", "Transpose",
       "Slice", "Split", "Resize", "ConstantOfShape", "Constant", "Sigmoid", "Mul", "Sub", "Div", "Pow", "Sqrt",
       "Clip", "LayerNormalization", "Einsum", "TopK", "NonZero", "Range", "Expand", "Tile", "Where", "Pad",
       "MaxPool", "AveragePool", "GlobalAveragePool", "Flatten", "Squeeze", "Unsqueeze", "ReduceMean", "ArgMax",
       "CumSum", "Scan", "SequenceConstruct", "RandomNormal", "MatMulInteger", "ConvTranspose", "Zorp", ""]
DOMAINS = ["com.example", "ai.onnx.ml", "com.microsoft", "", "ai.onnx", "x.y", "ai.onnx.preview.training"]
OPSETS = [0, 1, 5, 7, 9, 11, 13, 17, 19, 21, 22, 23, 24, 25, 26, 30, 1000, -1, 2**40]
IR_VERSIONS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 100, -1]
LOCATIONS = ["../outside.data", "/etc/hostname", "nope.data", "model.onnx", "model.onnx.data/x", "", "a\\b",
             "sub/../model.onnx.data", ".", "model.onnx.data\0x", "C:model.onnx.data", "./model.onnx.data"]
NAMES = ["dangling", "", "x", "y", "W", "shape", "b1", "h"]


@dataclass
class Mutant:
    seed: object  # a _fuzz_seeds.Seed
    files: dict[str, bytes]
    edits: list[str] = field(default_factory=list)  # what was done, one line per edit
    streams: list[str] = field(default_factory=list)  # the random stream of each edit (for replay)


def mutate(seed, rng_seed: str, max_edits: int = 3) -> Mutant:
    """A mutant of ``seed``: 1 to ``max_edits`` edits, each from its own random stream ``rng_seed/k``."""
    top = random.Random(rng_seed)
    count = min(max_edits, top.choice([1, 1, 1, 1, 1, 1, 2, 2, 2, 3]))
    return replay(seed, [f"{rng_seed}/{k}" for k in range(count)])


def replay(seed, streams: list[str]) -> Mutant:
    files, edits, used = dict(seed.files), [], []
    for stream in streams:
        rng = random.Random(stream)
        for _ in range(8):  # an edit that does not apply to this model draws again
            result = _one_edit(seed, files, rng)
            if result is not None:
                files, what = result
                edits.append(what)
                used.append(stream)
                break
    return Mutant(seed, files, edits, used)


def _one_edit(seed, files, rng):
    if seed.kind == "onnx":
        family = rng.choices(["bytes", "proto"], weights=[3, 7])[0]
    else:
        family = rng.choices(["bytes", "zip"], weights=[3, 7])[0]
    if family == "bytes":
        name = rng.choice(sorted(files)) if rng.random() < 0.3 else seed.main
        data, what = byte_edit(files[name], rng)
        return {**files, name: data}, f"{name}: {what}"
    if family == "zip":
        out = zip_edit(files[seed.main], rng)
        return None if out is None else ({**files, seed.main: out[0]}, f"{seed.main}: {out[1]}")
    out = proto_edit(files[seed.main], rng, has_data=len(files) > 1)
    return None if out is None else ({**files, seed.main: out[0]}, f"{seed.main}: {out[1]}")


# -- bytes ------------------------------------------------------------------------------------------------------
def byte_edit(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    if not data:
        return b"\x08", "empty file given one byte"
    kind = rng.choice(["truncate", "flip", "overwrite", "insert", "delete"]) if rng.random() < 0.97 else "empty"
    n = len(data)
    if kind == "truncate":
        at = rng.randrange(n)
        return data[:at], f"truncated to {at} of {n} bytes"
    if kind == "flip":
        b = bytearray(data)
        spots = [rng.randrange(n) for _ in range(rng.choice([1, 1, 2, 4, 8]))]
        for s in spots:
            b[s] ^= 1 << rng.randrange(8)
        return bytes(b), f"bits flipped at {spots}"
    if kind == "overwrite":
        at, size = rng.randrange(n), rng.choice([1, 2, 4, 8, 16])
        junk = bytes(rng.choice([0, 0xFF, rng.randrange(256)]) for _ in range(size))
        return data[:at] + junk + data[at + size:], f"{size} bytes overwritten at {at} with {junk.hex()}"
    if kind == "insert":
        at = rng.randrange(n)
        junk = bytes(rng.randrange(256) for _ in range(rng.choice([1, 3, 7])))
        return data[:at] + junk + data[at:], f"{junk.hex()} inserted at {at}"
    if kind == "delete":
        at, size = rng.randrange(n), rng.choice([1, 2, 5, 13])
        return data[:at] + data[at + size:], f"{size} bytes deleted at {at}"
    return b"", "emptied"


# -- ONNX fields ------------------------------------------------------------------------------------------------


def _all_nodes(model):
    return [(g, n) for g in graphs(model.graph) for n in g.node]


def _tensors(model):
    return [t for g in graphs(model.graph) for t in g.initializer] + [
        a.t for _, n in _all_nodes(model) for a in n.attribute if a.HasField("t")]


def _value_infos(model):
    g = model.graph
    return [*g.input, *g.output, *g.value_info]


def proto_edit(data: bytes, rng: random.Random, has_data: bool = False) -> tuple[bytes, str] | None:
    import onnx

    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception:
        return None
    edits = [e for e in EDITS if e is not _external or has_data or rng.random() < 0.3]
    edit = rng.choice(edits)
    try:
        what = edit(model, rng)
    except (ValueError, TypeError, OverflowError, IndexError):  # an edit this model's values cannot take
        return None
    if what is None:
        return None
    try:
        return model.SerializeToString(), what
    except Exception:
        return None


def _op_type(model, rng):
    nodes = _all_nodes(model)
    if not nodes:
        return None
    _, n = rng.choice(nodes)
    old, n.op_type = n.op_type, rng.choice(OPS)
    return f"node '{n.name or n.output[0] if n.output else ''}' op_type {old} -> {n.op_type!r}"


def _domain(model, rng):
    nodes = _all_nodes(model)
    if not nodes:
        return None
    _, n = rng.choice(nodes)
    n.domain = rng.choice(DOMAINS)
    return f"{n.op_type} domain -> {n.domain!r}"


def _opset(model, rng):
    kind = rng.choice(["version", "version", "add", "remove"])
    if kind == "remove" and model.opset_import:
        i = rng.randrange(len(model.opset_import))
        removed = model.opset_import[i]
        what = f"opset import {removed.domain!r} {removed.version} removed"
        del model.opset_import[i]
        return what
    if kind == "add" or not model.opset_import:
        entry = model.opset_import.add()
        entry.domain, entry.version = rng.choice(DOMAINS), rng.choice(OPSETS)
        return f"opset import added: {entry.domain!r} {entry.version}"
    entry = rng.choice(model.opset_import)
    entry.version = rng.choice(OPSETS)
    return f"opset {entry.domain!r} -> {entry.version}"


def _ir_version(model, rng):
    model.ir_version = rng.choice(IR_VERSIONS)
    return f"ir_version -> {model.ir_version}"


def _dims(model, rng):
    if rng.random() < 0.5:
        tensors = _tensors(model)
        if not tensors:
            return None
        t = rng.choice(tensors)
        if t.dims and rng.random() < 0.7:
            i = rng.randrange(len(t.dims))
            t.dims[i] = rng.choice([0, 1, -1, t.dims[i] * 2, t.dims[i] + 1, 2**31, 2**40])
            return f"initializer '{t.name}' dim {i} -> {t.dims[i]}"
        if t.dims and rng.random() < 0.5:
            t.dims.pop()
            return f"initializer '{t.name}' lost its last dim"
        t.dims.append(rng.choice([1, 2, 3]))
        return f"initializer '{t.name}' got an extra dim {t.dims[-1]}"
    infos = [vi for vi in _value_infos(model) if vi.type.HasField("tensor_type")]
    if not infos:
        return None
    vi = rng.choice(infos)
    shape = vi.type.tensor_type.shape
    if shape.dim and rng.random() < 0.8:
        d = rng.choice(shape.dim)
        choice = rng.choice([0, -1, 1, 3, 10**6, 2**40, "sym"])
        if choice == "sym":
            d.dim_param = "Q"
        else:
            d.dim_value = choice
        return f"value '{vi.name}' dim -> {choice}"
    if rng.random() < 0.5:
        vi.type.tensor_type.ClearField("shape")
        return f"value '{vi.name}' lost its shape"
    shape.dim.add().dim_value = 2
    return f"value '{vi.name}' got an extra dim"


def _data_type(model, rng):
    code = rng.choice(list(range(0, 26)) + [100])
    if rng.random() < 0.5:
        tensors = _tensors(model)
        if not tensors:
            return None
        t = rng.choice(tensors)
        t.data_type = code
        return f"initializer '{t.name}' data_type -> {code}"
    infos = [vi for vi in _value_infos(model) if vi.type.HasField("tensor_type")]
    if not infos:
        return None
    vi = rng.choice(infos)
    vi.type.tensor_type.elem_type = code
    return f"value '{vi.name}' elem_type -> {code}"


def _attribute(model, rng):
    from onnx import AttributeProto

    nodes = _all_nodes(model)
    if not nodes:
        return None
    _, n = rng.choice(nodes)
    kind = rng.choice(["value", "value", "type", "remove", "add", "duplicate"])
    if kind == "add" or not n.attribute:
        a = n.attribute.add()
        a.name = rng.choice(["axis", "alpha", "transB", "epsilon", "bogus", "pads", "group", "to", "perm"])
        a.type, a.i = AttributeProto.INT, rng.choice([-3, 0, 1, 2, 99])
        return f"{n.op_type} got attribute {a.name}={a.i}"
    a = rng.choice(n.attribute)
    if kind == "remove":
        name = a.name
        n.attribute.remove(a)
        return f"{n.op_type} lost attribute {name}"
    if kind == "duplicate":
        n.attribute.add().CopyFrom(a)
        return f"{n.op_type} attribute {a.name} duplicated"
    if kind == "type":
        a.type = rng.choice([t for t in range(0, 15) if t != a.type])
        return f"{n.op_type} attribute {a.name} type -> {a.type}"
    if a.type == AttributeProto.INT:
        a.i = rng.choice([-(2**40), -2, -1, 0, 1, 2, 3, 7, 2**31, 2**62])
        return f"{n.op_type} {a.name}={a.i}"
    if a.type == AttributeProto.FLOAT:
        a.f = rng.choice([float("nan"), float("inf"), -1.0, 0.0, 1e30, 1e-30])
        return f"{n.op_type} {a.name}={a.f}"
    if a.type == AttributeProto.INTS:
        if a.ints and rng.random() < 0.5:
            a.ints[rng.randrange(len(a.ints))] = rng.choice([-5, -1, 0, 99, 2**40])
        else:
            a.ints.append(rng.choice([0, 1, -1]))
        return f"{n.op_type} {a.name}={list(a.ints)}"
    if a.type == AttributeProto.STRING:
        a.s = rng.choice([b"", b"\xff\xfe", b"nonsense", b"NOTSET"])
        return f"{n.op_type} {a.name}={a.s!r}"
    if a.type == AttributeProto.GRAPH:
        g = a.g
        if g.output and rng.random() < 0.5:
            g.output[0].name = "dangling"
            return f"{n.op_type} {a.name} output -> 'dangling'"
        if g.node:
            del g.node[:]
            return f"{n.op_type} {a.name} emptied"
        g.output.add().CopyFrom(g.output[0]) if g.output else None
        return f"{n.op_type} {a.name} output duplicated"
    if a.type == AttributeProto.TENSOR:
        a.t.dims.append(3)
        return f"{n.op_type} {a.name} tensor got an extra dim"
    n.attribute.remove(a)
    return f"{n.op_type} lost attribute {a.name}"


def _names(model, rng):
    g = model.graph
    nodes = _all_nodes(model)
    kind = rng.choice(["node input", "node input", "node output", "graph output", "graph input", "initializer"])
    name = rng.choice(NAMES)
    if kind == "node input" and nodes:
        _, n = rng.choice(nodes)
        if n.input:
            i = rng.randrange(len(n.input))
            n.input[i] = name
            return f"{n.op_type} input {i} -> {name!r}"
    if kind == "node output" and nodes:
        _, n = rng.choice(nodes)
        if n.output:
            i = rng.randrange(len(n.output))
            n.output[i] = name
            return f"{n.op_type} output {i} -> {name!r}"
    if kind == "graph output" and g.output:
        if rng.random() < 0.3:
            g.output.add().CopyFrom(g.output[0])
            return f"graph output '{g.output[0].name}' listed twice"
        g.output[0].name = name
        return f"graph output 0 -> {name!r}"
    if kind == "graph input" and g.input:
        if rng.random() < 0.5:
            g.input.add().CopyFrom(g.input[0])
            return f"graph input '{g.input[0].name}' listed twice"
        g.input[0].name = name
        return f"graph input 0 -> {name!r}"
    if kind == "initializer" and g.initializer:
        t = rng.choice(g.initializer)
        old, t.name = t.name, name
        return f"initializer {old!r} renamed {name!r}"
    return None


def _external(model, rng):
    from onnx import TensorProto

    tensors = _tensors(model)
    if not tensors:
        return None
    external = [t for t in tensors if t.data_location == TensorProto.EXTERNAL]
    if not external:  # make one external, pointing somewhere
        t = rng.choice(tensors)
        t.ClearField("raw_data")
        for f in ("float_data", "int32_data", "int64_data", "double_data"):
            t.ClearField(f)
        t.data_location = TensorProto.EXTERNAL
        t.external_data.add(key="location", value=rng.choice(["model.onnx", *LOCATIONS]))
        return f"initializer '{t.name}' made external at {t.external_data[0].value!r}"
    t = rng.choice(external)
    info = {e.key: e.value for e in t.external_data}
    key = rng.choice(["location", "offset", "length", "location", "checksum", "drop"])
    if key == "drop":
        t.ClearField("data_location")
        return f"initializer '{t.name}' no longer marked external"
    if key == "location":
        info["location"] = rng.choice(LOCATIONS)
    elif key == "checksum":
        info["checksum"] = "0"
    else:
        info[key] = rng.choice(["-1", "0", "1", "4095", "4096", "999999999", "abc", "", "1e3", str(2**64)])
    del t.external_data[:]
    for k, v in info.items():
        t.external_data.add(key=k, value=v)
    return f"initializer '{t.name}' external {key} -> {info.get(key)!r}"


def _remove_or_duplicate(model, rng):
    g = model.graph
    kind = rng.choice(["remove node", "duplicate node", "remove initializer", "duplicate initializer",
                       "reverse nodes", "remove output", "remove input"])
    if kind == "remove node" and g.node:
        i = rng.randrange(len(g.node))
        op = g.node[i].op_type
        del g.node[i]
        return f"node {i} ({op}) removed"
    if kind == "duplicate node" and g.node:
        n = rng.choice(g.node)
        g.node.add().CopyFrom(n)
        return f"node {n.op_type} duplicated"
    if kind == "remove initializer" and g.initializer:
        i = rng.randrange(len(g.initializer))
        name = g.initializer[i].name
        del g.initializer[i]
        return f"initializer '{name}' removed"
    if kind == "duplicate initializer" and g.initializer:
        t = rng.choice(g.initializer)
        g.initializer.add().CopyFrom(t)
        return f"initializer '{t.name}' duplicated"
    if kind == "reverse nodes" and len(g.node) > 1:
        nodes = list(g.node)[::-1]
        del g.node[:]
        g.node.extend(nodes)
        return "nodes in reverse order"
    if kind == "remove output" and g.output:
        name = g.output[0].name
        del g.output[0]
        return f"graph output '{name}' removed"
    if kind == "remove input" and g.input:
        name = g.input[0].name
        del g.input[0]
        return f"graph input '{name}' removed"
    return None


def _payload(model, rng):
    import numpy as np

    tensors = [t for t in _tensors(model) if t.HasField("raw_data") and t.raw_data]
    if not tensors:
        return None
    t = rng.choice(tensors)
    kind = rng.choice(["short", "long", "nan", "both"])
    if kind == "short":
        t.raw_data = t.raw_data[: rng.randrange(len(t.raw_data))]
        return f"initializer '{t.name}' raw_data cut to {len(t.raw_data)} bytes"
    if kind == "long":
        t.raw_data = t.raw_data + b"\0" * rng.choice([1, 4, 64])
        return f"initializer '{t.name}' raw_data made longer"
    if kind == "both":
        t.float_data.extend([1.0, 2.0])
        return f"initializer '{t.name}' has raw_data and float_data"
    if t.data_type == 1:
        values = np.frombuffer(t.raw_data, np.float32).copy()
        values[rng.randrange(values.size)] = rng.choice([np.nan, np.inf, -np.inf, 3e38])
        t.raw_data = values.tobytes()
        return f"initializer '{t.name}' got a non-finite or huge value"
    return None


def _reshaped(model, rng):
    """An initializer replaced by one of another shape or type whose bytes fit it (the file stays readable; the
    graph may no longer type-check, or only the passes may notice)."""
    import numpy as np
    from onnx import numpy_helper

    g = model.graph
    tensors = [t for t in g.initializer if t.data_type in (1, 7, 10, 11) and t.data_location != 1]
    if not tensors:
        return None
    t = rng.choice(tensors)
    try:
        old = numpy_helper.to_array(t)
    except Exception:
        return None
    shape = list(old.shape)
    kind = rng.choice(["dim", "dim", "rank", "dtype", "values"])
    gen = np.random.default_rng(rng.randrange(2**32))
    if kind == "dim" and shape:
        i = rng.randrange(len(shape))
        shape[i] = rng.choice([0, 1, shape[i] + 1, max(shape[i] - 1, 0), shape[i] * 2])
    elif kind == "rank":
        shape = shape[1:] if shape and rng.random() < 0.5 else [1, *shape]
    dtype = rng.choice([np.float64, np.float16, np.int64, np.int32, np.uint8, np.bool_]) if kind == "dtype" \
        else old.dtype
    with np.errstate(all="ignore"):
        new = (gen.standard_normal(shape) * 3).astype(dtype)
    if kind == "values":
        special = [0.0, 1e-45, 1e30, -1e30, float("nan"), float("inf")] if old.dtype.kind == "f" else [0, -1, 2**62]
        with np.errstate(all="ignore"):
            new = np.full_like(old, rng.choice(special))
    t.CopyFrom(numpy_helper.from_array(new, t.name))
    return f"initializer '{t.name}' replaced by a {list(new.shape)} {new.dtype} array ({kind})"


EDITS = [_op_type, _domain, _opset, _ir_version, _dims, _data_type, _attribute, _names, _external,
         _remove_or_duplicate, _payload, _reshaped, _reshaped, _reshaped]


# -- zip members ------------------------------------------------------------------------------------------------
def zip_edit(data: bytes, rng: random.Random) -> tuple[bytes, str] | None:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            members = [(info, zf.read(info)) for info in zf.infolist()]
    except Exception:
        return None
    if not members:
        return None
    root = members[0][0].filename.split("/")[0]
    kind = rng.choice(["truncate", "flip", "replace", "remove", "add", "json", "json", "rename"])
    i = rng.randrange(len(members))
    info, content = members[i]
    what = ""
    if kind == "truncate":
        members[i] = (info, content[: rng.randrange(len(content) + 1)])
        what = f"member {info.filename} truncated to {len(members[i][1])} bytes"
    elif kind == "flip" and content:
        b = bytearray(content)
        spot = rng.randrange(len(b))
        b[spot] ^= 1 << rng.randrange(8)
        members[i] = (info, bytes(b))
        what = f"member {info.filename} bit flipped at {spot}"
    elif kind == "replace":
        members[i] = (info, rng.choice([b"", b"junk", b"\x80\x04junk", b"{}", b"[]", b"null", b"PK\x03\x04"]))
        what = f"member {info.filename} replaced by {members[i][1]!r}"
    elif kind == "remove":
        del members[i]
        what = f"member {info.filename} removed"
    elif kind == "add":
        name = rng.choice(["data/aotinductor/model.so", "models/custom_obj_0", "data/constants/opaque_obj_1",
                           "constants.pkl", "data.pkl", "archive_format", "extra.json"])
        members.append((zipfile.ZipInfo(f"{root}/{name}"), rng.choice([b"pt2", b"junk", b"\x80\x04N."])))
        what = f"member {root}/{name} added"
    elif kind == "rename":
        new = info.filename.replace(root, rng.choice(["other", "", root + "x"]), 1).lstrip("/") or "x"
        members[i] = (zipfile.ZipInfo(new), content)
        what = f"member {info.filename} renamed {new}"
    elif kind == "json":
        candidates = [k for k, (inf, _) in enumerate(members) if inf.filename.endswith(".json")]
        if not candidates:
            return None
        i = rng.choice(candidates)
        info, content = members[i]
        try:
            doc = json.loads(content)
        except ValueError:
            return None
        path = _json_edit(doc, rng)
        if path is None:
            return None
        members[i] = (info, json.dumps(doc).encode())
        what = f"member {info.filename}: {path}"
    else:
        return None
    out = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        warnings.simplefilter("ignore")  # a duplicate member name is one of the corruptions
        for info, content in members:
            zf.writestr(zipfile.ZipInfo(info.filename, info.date_time), content)
    return out.getvalue(), what


def _json_edit(doc, rng: random.Random) -> str | None:
    """Change one leaf (or container) of a JSON document in place; returns its path and the change."""
    path, node = [], doc
    for _ in range(rng.randrange(2, 12)):
        if isinstance(node, dict) and node:
            key = rng.choice(sorted(node))
        elif isinstance(node, list) and node:
            key = rng.randrange(len(node))
        else:
            break
        parent, node = node, node[key]
        path.append(key)
        if not isinstance(node, (dict, list)) or rng.random() < 0.15:
            break
    if not path:
        return None
    new = rng.choice([None, -1, 0, 10**12, "junk", "", [], {}, True, 1.5,
                      node * 2 if isinstance(node, (int, float)) and not isinstance(node, bool) else "x"])
    parent[path[-1]] = new
    return f"{'/'.join(map(str, path))} -> {json.dumps(new)}"
