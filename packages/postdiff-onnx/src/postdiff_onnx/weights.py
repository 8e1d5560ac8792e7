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
from pathlib import Path

WEIGHTS_FILE = "weights.onnx.data"
WEIGHTS_INDEX = "weights.index.json"
ALIGN = 4096  # bytes: page-aligned offsets, so each tensor can be memory-mapped in place
# Smaller tensors stay inside their graph, as torch.onnx leaves them. Moving biases and norms (64 to 1,023 bytes)
# out too was measured on the reference bundle: each graph shrank 21 kB but weights.index.json grew 14 kB per graph
# and the file 140 kB in alignment, so a pointer to a small tensor costs more than the tensor.
MIN_BYTES = 1024


def _tensors(proto):
    from onnx.external_data_helper import _get_all_tensors

    return _get_all_tensors(proto)


def _external(tensor) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def share_weights(folder: Path, files: list[str]) -> tuple[int, dict[str, str]]:
    """Rewrite the graphs ``files`` of the bundle in ``folder`` to read every tensor from ``WEIGHTS_FILE``, each
    distinct tensor stored once, without the exporter's debugging metadata; remove the per-graph data files.
    Graph files that come out byte-identical (a cached variant whose shallow part has no cross-attention to cache
    is the plain shallow graph) are kept once. Returns the bytes of the shared file and {removed file: the
    identical file kept}, for the manifest to point at."""
    import onnx
    from onnx import TensorProto

    stored: dict[tuple, tuple[int, int]] = {}  # (dtype, sha256) -> (offset, length)
    index: dict[str, list] = {}  # graph file -> [[initializer, offset, length, numpy dtype, dims], ...]
    old: set[str] = set()
    kept: dict[str, str] = {}  # sha256 of a rewritten graph -> its file
    same: dict[str, str] = {}  # graph file removed as a copy -> the file kept
    tmp = folder / (WEIGHTS_FILE + ".partial")
    with open(tmp, "wb") as out:
        for name in dict.fromkeys(files):
            path = folder / name
            proto = onnx.load(str(path), load_external_data=False)
            for tensor in _tensors(proto):
                if tensor.data_location == TensorProto.EXTERNAL:
                    info = _external(tensor)
                    old.add(info["location"])
                    with open(folder / info["location"], "rb") as f:
                        f.seek(int(info.get("offset", 0)))
                        data = f.read(int(info["length"])) if "length" in info else f.read()
                elif tensor.HasField("raw_data") and len(tensor.raw_data) >= MIN_BYTES:
                    data = tensor.raw_data
                else:
                    continue
                key = (tensor.data_type, hashlib.sha256(data).hexdigest())
                if key not in stored:
                    out.write(b"\0" * (-out.tell() % ALIGN))
                    stored[key] = (out.tell(), len(data))
                    out.write(data)
                offset, length = stored[key]
                tensor.ClearField("raw_data")
                tensor.data_location = TensorProto.EXTERNAL
                del tensor.external_data[:]
                for k, v in (("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(length))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = k, v

            _strip_exporter_metadata(proto)
            graph_bytes = proto.SerializeToString()  # the graph only: its tensors have no raw data left to write
            digest = hashlib.sha256(graph_bytes).hexdigest()
            if digest in kept:
                same[name] = kept[digest]
                path.unlink()
                continue
            kept[digest] = name
            index[name] = _shared_entries(proto)
            path.write_bytes(graph_bytes)
        size = out.tell()
    os.replace(tmp, folder / WEIGHTS_FILE)
    (folder / WEIGHTS_INDEX).write_text(json.dumps(index, separators=(",", ":")))
    for name in old - {WEIGHTS_FILE}:
        (folder / name).unlink(missing_ok=True)
    return size, same


def _strip_exporter_metadata(proto) -> None:
    """torch.onnx records, per node, the FX node, module stack and stack trace it came from, and the exported
    program's signature: debugging aids that made up about 75% of each reference-model graph file (0.9 of 1.2 MB)
    and would be repeated in every variant graph; and the shapes of intermediate values. Runtimes need none of them."""
    for node in proto.graph.node:
        del node.metadata_props[:]
    del proto.graph.value_info[:]  # intermediate shape annotations: runtimes infer them again (about 9% of a graph)
    kept = [m for m in proto.metadata_props if not m.key.startswith("pkg.torch.")]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)


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
                self._index = json.loads(index_file.read_text())
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
        if tensor.data_location == TensorProto.EXTERNAL and info.get("location") == WEIGHTS_FILE:
            dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type).str
            entries.append([tensor.name, int(info["offset"]), int(info["length"]), dtype, list(tensor.dims)])
    return entries
