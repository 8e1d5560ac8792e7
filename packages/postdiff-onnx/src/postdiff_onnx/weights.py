"""One copy of the weights per ONNX bundle: every tensor of every graph stored once, in ``weights.onnx.data``.

The exporter writes a data file per graph (``torch.onnx`` saves each graph alone), and the variant graphs of one
UNet share nearly all their weights: ``full`` and ``full_capture`` hold the same tensors, ``shallow`` a subset.
``share_weights`` rewrites the bundle's graphs so that each tensor's bytes sit once in one file, at an offset
the graphs' external-data entries point at (the ONNX external-data format: ``location``, ``offset``, ``length``),
aligned to a page so that a runtime can map them. ``SharedInitializers`` gives a runtime one ``OrtValue`` per
stored tensor, mapped from that file, to hand every session (``SessionOptions.add_initializer``), so the
sessions of a bundle hold one copy of the weights in memory too. ``WEIGHTS_INDEX`` lists, per graph, each
initializer's name, offset, length, dtype and shape, so that the runtime needs no ``onnx`` package to read them.
"""

from __future__ import annotations

import hashlib
import json
import os
from itertools import count
from pathlib import Path

WEIGHTS_FILE = "weights.onnx.data"
WEIGHTS_INDEX = "weights.index.json"
ALIGN = 4096  # bytes: page-aligned offsets, so each tensor can be memory-mapped in place
# Tensors under MIN_BYTES (biases, norms) are packed at SMALL_ALIGN after the large ones and left out of
# WEIGHTS_INDEX: each session reads its own copy of them from the file (under 40 kB a graph on the reference model).
# Page-aligning them and listing them in the index, measured on the reference bundle, cost more bytes (140 kB of
# padding, 14 kB of index a graph) than keeping them inside every graph. Under INLINE_BYTES (shape constants) the
# tensor is smaller than a pointer to it (about 60 bytes of external-data entries) and stays in the graph.
MIN_BYTES = 1024
SMALL_ALIGN = 16
INLINE_BYTES = 64
# Only floating-point and 8-bit tensors are weights (int8 weights of --weights int8, the packed uint8 blocks of
# int4). Wider integer tensors are shapes, pads, axes and indices: they stay inside the graph whatever their size,
# because ONNX shape inference, which runs when a session loads the graph, cannot read them from an external file
# (a 4-D Pad's 64-byte int64 pads made the graph fail to load).
WEIGHT_TYPES = (1, 2, 3, 10, 11, 16)  # TensorProto FLOAT, UINT8, INT8, FLOAT16, DOUBLE, BFLOAT16


def _tensors(proto):
    from onnx.external_data_helper import _get_all_tensors

    return _get_all_tensors(proto)


def _external(tensor) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def share_weights(folder: Path, files: list[str]) -> tuple[int, dict[str, str]]:
    """Rewrite the graphs ``files`` of the bundle in ``folder`` to read every tensor from ``WEIGHTS_FILE``, each
    distinct tensor stored once (small ones too, packed tightly), without the exporter's debugging metadata; remove
    the per-graph data files.
    Graph files that come out byte-identical (a cached variant whose shallow part has no cross-attention to cache
    is the plain shallow graph) are kept once. Returns the bytes of the shared file and {removed file: the
    identical file kept}, for the manifest to point at."""
    import onnx
    from onnx import TensorProto

    stored: dict[tuple, tuple[bool, int, int]] = {}  # (dtype, sha256) -> (small?, offset, length)
    small = bytearray()  # tensors under MIN_BYTES, packed after the large ones (their offsets known at the end)
    protos: dict[str, object] = {}
    placed: list[tuple] = []  # (tensor, its key in ``stored``): offsets and lengths are written once all are known
    old: set[str] = set()
    tmp = folder / (WEIGHTS_FILE + ".partial")
    with open(tmp, "wb") as out:
        for name in dict.fromkeys(files):
            proto = protos[name] = onnx.load(str(folder / name), load_external_data=False)
            for tensor in _tensors(proto):
                if tensor.data_location == TensorProto.EXTERNAL:
                    info = _external(tensor)
                    old.add(info["location"])
                    with open(folder / info["location"], "rb") as f:
                        f.seek(int(info.get("offset", 0)))
                        data = f.read(int(info["length"])) if "length" in info else f.read()
                    if tensor.data_type not in WEIGHT_TYPES:  # back into the graph
                        del tensor.external_data[:]
                        tensor.data_location = TensorProto.DEFAULT
                        tensor.raw_data = data
                        continue
                elif tensor.data_type not in WEIGHT_TYPES:
                    continue
                elif tensor.HasField("raw_data") and len(tensor.raw_data) >= INLINE_BYTES:
                    data = tensor.raw_data
                else:
                    continue
                key = (tensor.data_type, hashlib.sha256(data).hexdigest())
                if key not in stored:
                    if len(data) >= MIN_BYTES:
                        out.write(b"\0" * (-out.tell() % ALIGN))
                        stored[key] = (False, out.tell(), len(data))
                        out.write(data)
                    else:
                        small.extend(b"\0" * (-len(small) % SMALL_ALIGN))
                        stored[key] = (True, len(small), len(data))
                        small.extend(data)
                tensor.ClearField("raw_data")
                tensor.data_location = TensorProto.EXTERNAL
                del tensor.external_data[:]
                placed.append((tensor, key))
        out.write(b"\0" * (-out.tell() % ALIGN))
        base = out.tell()
        out.write(small)
        size = out.tell()

    index: dict[str, list] = {}  # graph file -> [[initializer, offset, length, numpy dtype, dims], ...]
    names: dict[tuple, str] = {}  # (exporter's initializer name, its bytes' key) -> short name, bundle-wide
    kept: dict[str, str] = {}  # sha256 of a rewritten graph -> its file
    same: dict[str, str] = {}  # graph file removed as a copy -> the file kept
    for tensor, key in placed:
        is_small, offset, length = stored[key]
        for k, v in (("location", WEIGHTS_FILE), ("offset", str(offset + base * is_small)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = k, v
    for name, proto in protos.items():
        _compact(proto, names)
        graph_bytes = proto.SerializeToString()  # the graph only: its tensors have no raw data left to write
        digest = hashlib.sha256(graph_bytes).hexdigest()
        if digest in kept:
            same[name] = kept[digest]
            (folder / name).unlink()
            continue
        kept[digest] = name
        index[name] = _shared_entries(proto)
        (folder / name).write_bytes(graph_bytes)
    os.replace(tmp, folder / WEIGHTS_FILE)
    originals = {short: original for (original, _), short in names.items()}
    (folder / WEIGHTS_INDEX).write_text(json.dumps({"graphs": index, "names": originals}, separators=(",", ":")))
    for name in old - {WEIGHTS_FILE}:
        (folder / name).unlink(missing_ok=True)
    return size, same


def _compact(proto, names: dict[tuple, str]) -> None:
    """Drop what runtimes do not need from a graph, which made up about 85% of each reference-model graph file and
    would be repeated in every variant graph. torch.onnx records, per node, the FX node, module stack and stack trace
    it came from, on the graph the exported program's signature (42 kB a reference graph), and the shapes of
    intermediate values: debugging aids, all removed. Nodes lose their names (optional in ONNX); intermediate values
    and initializers get short ones (the exporter's long names were half of what was left). ``names`` gives one
    short name per (exporter's name, bytes) across the bundle's graphs, and WEIGHTS_INDEX keeps the originals
    ("names": short -> exporter's name). Graph inputs and outputs keep their names: they are the graph's interface."""
    graph = proto.graph
    for node in graph.node:
        del node.metadata_props[:]
    del graph.value_info[:]  # intermediate shape annotations: runtimes infer them again (about 9% of a graph)
    for props in (proto.metadata_props, graph.metadata_props):
        kept = [m for m in props if not m.key.startswith("pkg.torch.")]
        del props[:]
        props.extend(kept)
    if any(a.HasField("g") or len(a.graphs) for node in graph.node for a in node.attribute):
        return  # a subgraph may name outer values: leave the names as they are
    interface = {v.name for v in (*graph.input, *graph.output)} | {""}
    taken = interface | set(names.values())  # every name a new short one must differ from
    short: dict[str, str] = {}
    for tensor in graph.initializer:
        if tensor.name not in interface:
            info = _external(tensor)
            key = (tensor.name, f"{info['offset']}:{info['length']}" if info else hashlib.sha256(tensor.SerializeToString()).hexdigest())
            if key not in names:
                names[key] = _fresh("w", len(names), taken)
            short[tensor.name] = names[key]
            tensor.name = names[key]
    for node in graph.node:  # every produced value first: nodes need not come in topological order (fp16 casts)
        for name in node.output:
            if name not in interface and name not in short:
                short[name] = _fresh("v", len(short), taken)
    for node in graph.node:
        node.name = ""
        for values in (node.input, node.output):
            for i, name in enumerate(values):
                values[i] = short.get(name, name)


def _fresh(prefix: str, start: int, taken: set[str]) -> str:
    """The first of prefix+hex(k), k counting from ``start``, not in ``taken``; added to it."""
    name = next(n for k in count(start) if (n := f"{prefix}{k:x}") not in taken)
    taken.add(name)
    return name


def weights_bytes(folder: Path) -> int:
    """Bytes of external weights in a bundle folder (its shared weights file, or each graph's own data file)."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.data") if p.is_file())


class SharedInitializers:
    """One ``OrtValue`` per tensor of a bundle's ``WEIGHTS_FILE``, mapped from the file and shared by every session
    of the bundle (``SessionOptions.add_initializer``). Bundles without the file (exported before it) get none, and
    each session loads its own data file as before."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.values: dict[tuple, object] = {}
        self._map = None
        self._index: dict | None = None

    def for_graph(self, path: Path) -> dict[str, object]:
        """{initializer name: OrtValue} for the graph file ``path`` (empty when it does not use the shared file)."""
        if not (self.folder / WEIGHTS_FILE).is_file():
            return {}
        import numpy as np
        import onnxruntime as ort

        if self._map is None:
            self._map = np.memmap(self.folder / WEIGHTS_FILE, dtype=np.uint8, mode="r")
        out = {}
        for name, offset, length, dtype, dims in self._entries(Path(path)):
            key = (offset, length, dtype, tuple(dims))
            if key not in self.values:
                array = self._map[offset : offset + length].view(np.dtype(dtype)).reshape(tuple(dims))
                self.values[key] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
            out[name] = self.values[key]
        return out

    def _entries(self, path: Path) -> list:
        """The graph's shared initializers: from ``WEIGHTS_INDEX``, or, for bundles written before it, read from
        the graph with the ``onnx`` package when it is installed (without it, each session loads its own)."""
        index_file = self.folder / WEIGHTS_INDEX
        if index_file.is_file():
            if self._index is None:
                index = json.loads(index_file.read_text())
                self._index = index.get("graphs", index)  # bundles of 2026-12-03 and before: {graph file: entries}
            return self._index.get(path.name, [])
        try:
            import onnx
        except ImportError:
            return []
        try:
            return _shared_entries(onnx.load(str(path), load_external_data=False))
        except Exception:  # a damaged graph: the session that opens it next reports it (postdiff_onnx.session)
            return []


def _shared_entries(proto) -> list:
    """[[name, offset, length, numpy dtype, dims], ...] of the graph's initializers stored in ``WEIGHTS_FILE``."""
    from onnx import TensorProto, helper

    entries = []
    for tensor in proto.graph.initializer:
        info = _external(tensor)
        if tensor.data_location == TensorProto.EXTERNAL and info.get("location") == WEIGHTS_FILE and int(info["length"]) >= MIN_BYTES:
            dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type).str
            entries.append([tensor.name, int(info["offset"]), int(info["length"]), dtype, list(tensor.dims)])
    return entries
