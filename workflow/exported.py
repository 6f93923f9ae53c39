"""The quantize stage's exported checkpoint, read as the GPU engines' ModelOpt loaders read it (TensorRT-LLM's and
vLLM's `quant_method: modelopt`): what it declares, and every quantized layer's tensors in the layout that format has.

    check(Path("results/quantize/fp8/checkpoint"), "fp8")  # {"quant_algo": "FP8", "quantized_layers": 196, ...}

ModelOpt's unified Hugging Face export writes config.json's `quantization_config` (quant_method modelopt, quant_algo,
the modules left out) and hf_quant_config.json, and per quantized Linear layer, beside `weight`:
- FP8: the weight as float8_e4m3fn, per-tensor `weight_scale` and `input_scale` (scalars);
- W8A8_SQ_PER_CHANNEL: the weight as int8, per-output-channel `weight_scale` [out], a per-tensor `input_scale` and
  the SmoothQuant `pre_quant_scale` [in];
- W4A16_AWQ: two int4 values a byte, packed along the output channels ([out / 2, in] uint8), `weight_scale`
  [out, in / group_size]; a `pre_quant_scale` [in] where it was not folded into the norm before the layer.
Only the headers of the safetensors files are read (no weights are loaded): the check costs seconds on a 70B model.
Every two-dimensional weight inside the decoder layers must be quantized; the excluded modules (lm_head, the
embeddings) stay in floating point.
"""

from __future__ import annotations

import json
from pathlib import Path

from workflow.schemes import SCHEMES

FLOAT = {"F32", "BF16", "F16"}


class ExportError(ValueError):
    """The exported checkpoint is not what the GPU engines' loaders read for its scheme."""


def _expected(algo: str, weight: list[int], group: int | None) -> tuple[str, dict[str, tuple[int, ...] | None]]:
    """(weight dtype, {scale tensor: its shape, None where optional}) of one quantized layer with this weight shape."""
    rows, cols = weight
    if algo == "FP8":
        return "F8_E4M3", {"weight_scale": (), "input_scale": ()}
    if algo == "W8A8_SQ_PER_CHANNEL":
        return "I8", {"weight_scale": (rows,), "input_scale": (), "pre_quant_scale": (cols,)}
    if algo == "W4A16_AWQ":
        if not group:
            raise ExportError("exported checkpoint: W4A16_AWQ without a group_size in hf_quant_config.json")
        return "U8", {"weight_scale": (2 * rows, cols // group), "pre_quant_scale": None}
    raise ExportError(f"exported checkpoint: no layout known for quant_algo {algo!r} (known: FP8, W8A8_SQ_PER_CHANNEL, W4A16_AWQ)")


def tensor_headers(checkpoint: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype, shape) of every tensor in the checkpoint's safetensors files, from their headers."""
    from safetensors import safe_open

    headers = {}
    for path in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(path, "pt") as handle:
            for name in handle.keys():
                part = handle.get_slice(name)
                headers[name] = (part.get_dtype(), list(part.get_shape()))
    if not headers:
        raise ExportError(f"{checkpoint}: no safetensors weights")
    return headers


def check(checkpoint: str | Path, scheme: str) -> dict:
    """What the checkpoint declares and holds, checked against the scheme's format; ExportError names what differs."""
    checkpoint, algo = Path(checkpoint), SCHEMES[scheme].quant_algo
    declared = json.loads((checkpoint / "config.json").read_text()).get("quantization_config")
    headers = tensor_headers(checkpoint)
    if algo is None:
        quantized = [name for name, (dtype, _) in headers.items() if dtype not in FLOAT]
        if declared or quantized:
            raise ExportError(f"{checkpoint}: {scheme} is unquantized, but the checkpoint declares {declared} / holds {quantized[:3]}")
        return {"format": "Hugging Face (unquantized)", "quant_algo": None, "dtypes": sorted({d for d, _ in headers.values()})}
    recipe = json.loads((checkpoint / "hf_quant_config.json").read_text())["quantization"]
    problems = []
    if not declared or declared.get("quant_method") != "modelopt" or declared.get("quant_algo") != algo:
        problems.append(f"config.json quantization_config {declared and {k: declared.get(k) for k in ('quant_method', 'quant_algo')}} "
                        f"is not quant_method modelopt, quant_algo {algo}")
    if recipe.get("quant_algo") != algo:
        problems.append(f"hf_quant_config.json quant_algo {recipe.get('quant_algo')} is not {algo}")
    group = recipe.get("group_size")
    layers = [name[: -len(".weight")] for name, (_, shape) in headers.items()
              if ".layers." in name and name.endswith(".weight") and len(shape) == 2]
    for layer in layers:
        dtype, shape = headers[f"{layer}.weight"]
        want, scales = _expected(algo, shape, group)
        if dtype != want:
            problems.append(f"{layer}.weight is {dtype}, not {want}")
        for scale, expected in scales.items():
            found = headers.get(f"{layer}.{scale}")
            if found is None and expected is not None:
                problems.append(f"{layer}.{scale} is missing")
            elif found is not None and expected is not None and tuple(found[1]) != expected:
                problems.append(f"{layer}.{scale} has shape {found[1]}, not {list(expected)}")
    excluded = declared.get("ignore", []) if declared else []
    for module in excluded:
        dtype = headers.get(f"{module}.weight", ("F32",))[0]
        if dtype not in FLOAT:
            problems.append(f"{module} is excluded from quantization but its weight is {dtype}")
    if not layers:
        problems.append("no decoder-layer weights found (tensor names without '.layers.')")
    if problems:
        raise ExportError(f"{checkpoint} is not a {algo} checkpoint the GPU engines load: " + "; ".join(problems[:8])
                          + (f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""))
    return {"format": "ModelOpt unified Hugging Face (quant_method modelopt)", "quant_algo": algo, "quantized_layers": len(layers),
            "weight_dtype": _expected(algo, headers[f"{layers[0]}.weight"][1], group)[0], "group_size": group,
            "scales": sorted({s for layer in layers for s in _expected(algo, headers[f"{layer}.weight"][1], group)[1]
                              if f"{layer}.{s}" in headers}),
            "excluded": excluded}
