"""Read what a TensorRT build did: the layer table and the 2:4 sparsity lines of its log.

"No speedup from 2:4" is the most common complaint about sparse deployment, and the answer is in two
places TensorRT does not surface by default: the log lines that list the layers *eligible* for sparse math
and the layers whose chosen tactic *is* sparse, and the per-layer tactic names of the engine inspector. This
module turns both into plain data for the report. It imports no TensorRT module: it parses text, so it is
tested without a GPU.

The log lines (TensorRT developer guide, "Structured Sparsity")::

    [I] [TRT] (Sparsity) Layers eligible for sparse math: conv1, conv2, conv3
    [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: conv2, conv3
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

__all__ = ["layers_from_inspector", "layers_from_log", "sparsity_from_log"]

_ELIGIBLE = re.compile(r"Layers eligible for sparse math:\s*(.*)", re.IGNORECASE)
_PICKED = re.compile(
    r"(?:picked sparse implementation for layers|layers with sparse tactics)\s*:?\s*(.*)", re.IGNORECASE
)
_LOG_LAYER = re.compile(
    r"^Name: (?P<name>.*?), LayerType: (?P<type>[^,]*), (?P<io>Inputs: .*), TacticName: (?P<tactic>.*?), "
    r"StreamId: (?P<stream>-?\d+), Metadata:\s*(?P<meta>.*)$"
)
_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]+)\]")
_DATATYPE = re.compile(r"Datatype: (\w+)")


def _split_names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def sparsity_from_log(messages: Iterable[str]) -> dict[str, list[str]]:
    """Layers TensorRT found eligible for 2:4 math and layers it built with sparse tactics.

    Both lists are empty when the log has no sparsity lines (sparse weights not requested, or an engine
    such as TensorRT-RTX whose builder ignores the request).
    """
    eligible: list[str] = []
    picked: list[str] = []
    for message in messages:
        for line in message.splitlines():
            if match := _ELIGIBLE.search(line):
                eligible.extend(_split_names(match.group(1)))
            elif match := _PICKED.search(line):
                picked.extend(_split_names(match.group(1)))
    return {"eligible": eligible, "sparse_tactics": picked}


def _layer(name: str, layer_type: str, tactic: str, metadata: str, datatypes: Iterable[str]) -> dict[str, Any]:
    return {
        "name": name,
        "type": layer_type,
        "tactic": tactic,
        "sparse_tactic": "sparse" in tactic.lower(),
        "onnx_nodes": _ONNX_LAYER.findall(metadata),
        "datatypes": sorted(set(datatypes)),
    }


def layers_from_log(messages: Iterable[str]) -> list[dict[str, Any]]:
    """The layer table that a verbose build with detailed profiling verbosity prints after "Layers:".

    This is the only layer information available where the engine cannot be deserialized (a TensorRT-RTX
    ahead-of-time build on a machine without a GPU).
    """
    layers: list[dict[str, Any]] = []
    for message in messages:
        if not message.startswith("Layers:"):
            continue
        for line in message.splitlines()[1:]:
            if match := _LOG_LAYER.match(line.strip()):
                layers.append(
                    _layer(
                        match["name"],
                        match["type"].strip(),
                        match["tactic"].strip(),
                        match["meta"],
                        _DATATYPE.findall(match["io"]),
                    )
                )
    return layers


def layers_from_inspector(info: str | dict[str, Any]) -> list[dict[str, Any]]:
    """The layer table of ``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)``.

    With ``ProfilingVerbosity.DETAILED`` each layer is a dict (Name, LayerType, Inputs, Outputs, TacticName,
    Metadata); with less verbosity it is only a name, which is kept as such.
    """
    data = json.loads(info) if isinstance(info, str) else info
    layers = []
    for entry in data.get("Layers", []):
        if isinstance(entry, str):
            layers.append(_layer(entry, "", "", "", ()))
            continue
        types = [
            str(t.get("Format/Datatype", t.get("Datatype", "")))
            for t in entry.get("Inputs", []) + entry.get("Outputs", [])
            if isinstance(t, dict)
        ]
        layers.append(
            _layer(
                str(entry.get("Name", "")),
                str(entry.get("LayerType", "")),
                str(entry.get("TacticName", entry.get("TacticValue", ""))),
                str(entry.get("Metadata", "")),
                [t for t in types if t],
            )
        )
    return layers
