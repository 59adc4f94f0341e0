"""Quality metrics against hand-computed values, on torch modules and through ONNX Runtime."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from prune2deploy.quality import as_model_fn, encoder_quality, lm_quality, text_windows


class LogitTable(torch.nn.Module):
    """logits = table[input_ids]: a bigram "language model" whose distributions are known exactly."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None):
        return (self.table[input_ids],)


def _onnx_table(table: np.ndarray) -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["logits"], axis=0)],
        "table",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", table.shape[1]])],
        [numpy_helper.from_array(table.astype(np.float32), "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    return model.SerializeToString()


def test_lm_metrics_by_hand():
    vocab = 4
    uniform = LogitTable(torch.zeros(vocab, vocab))
    peaked = torch.zeros(vocab, vocab)
    peaked[:, 0] = math.log(3.0)  # p = [1/2, 1/6, 1/6, 1/6] after every token
    ids = [0, 1, 2, 3, 0, 0, 1, 2]
    q = lm_quality(uniform, LogitTable(peaked), token_ids=ids, window=4, batch=1)
    # KL(uniform || p) = sum 1/4 log((1/4) / p_i) = 1/4 log(1/2) + 3/4 log(3/2)
    assert q.kl_mean == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    assert q.kl_max == pytest.approx(q.kl_mean)
    assert q.ppl_reference == pytest.approx(4.0)
    # Targets (next tokens inside each window of 4): 1,2,3 | 0,1,2 -> one 0 (p=1/2), five others (p=1/6)
    assert q.ppl_candidate == pytest.approx(math.exp(-(math.log(0.5) + 5 * math.log(1 / 6)) / 6))
    assert q.top1_agreement == 1.0  # argmax of a uniform row is token 0, the peak of p
    assert (q.tokens, q.windows) == (8, 2)


def test_identical_models_agree_and_onnx_matches_torch(rng):
    table = torch.from_numpy(rng.standard_normal((16, 16)).astype(np.float32))
    ids = rng.integers(0, 16, size=70)
    torch_model = LogitTable(table)
    onnx_model = _onnx_table(table.numpy())
    same = lm_quality(torch_model, onnx_model, token_ids=ids, window=8, batch=3)
    assert same.kl_mean == pytest.approx(0.0, abs=1e-9) and same.top1_agreement == 1.0
    assert same.ppl_reference == pytest.approx(same.ppl_candidate, rel=1e-6)
    assert same.windows == 8  # 70 tokens -> 8 windows of 8, the tail of 6 is dropped
    noisy = LogitTable(table + torch.from_numpy(rng.standard_normal((16, 16)).astype(np.float32)))
    worse = lm_quality(onnx_model, noisy, token_ids=ids, window=8)
    assert worse.kl_mean > 0.1 and worse.top1_agreement < 1.0


def test_text_windows():
    assert text_windows(range(10), 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert text_windows(range(10), 3, max_windows=1).shape == (1, 3)


class FixedEncoder:
    """A ModelFn returning fixed hidden states; padding positions hold junk that pooling must ignore."""

    def __init__(self, vector):
        self.vector = np.asarray(vector, dtype=np.float32)

    def __call__(self, ids, mask):
        out = np.broadcast_to(self.vector, (*ids.shape, self.vector.size)).copy()
        out[mask == 0] = 1000.0
        return out


class PadTokenizer:
    def __call__(self, sentences, padding, truncation, max_length, return_tensors):
        lengths = [len(s.split()) for s in sentences]
        width = max(lengths)
        mask = np.array([[1] * n + [0] * (width - n) for n in lengths])
        return {"input_ids": mask.copy(), "attention_mask": mask}


def test_encoder_cosine_by_hand():
    q = encoder_quality(
        FixedEncoder([1.0, 0.0]),
        FixedEncoder([1.0, 1.0]),
        tokenizer=PadTokenizer(),
        sentences=["one two", "one two three four"],
    )
    assert q.cosine_mean == pytest.approx(1 / math.sqrt(2)) and q.sentences == 2


def test_encoder_quality_on_bert(tiny_bert32):
    class Tok:
        def __call__(self, sentences, **kwargs):
            ids = np.array([[(len(w) * 7) % 50 for w in s.split()][:12] for s in sentences[:1]] * len(sentences))
            return {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    q = encoder_quality(tiny_bert32, as_model_fn(tiny_bert32), tokenizer=Tok(), max_sentences=4)
    assert q.cosine_min == pytest.approx(1.0, abs=1e-6) and q.sentences == 4


@pytest.mark.slow
def test_exported_onnx_matches_its_torch_model(tiny_llama_tied32, tmp_path):
    """The ONNX Runtime path on a real dynamo export (input_ids + attention_mask -> logits), about 10 s."""

    class Logits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    program = torch.onnx.export(
        Logits(tiny_llama_tied32),
        (ids, torch.ones_like(ids)),
        dynamo=True,
        opset_version=18,
        input_names=["input_ids", "attention_mask"],
        output_names=["logits"],
        dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
    )
    path = tmp_path / "tiny.onnx"
    program.save(str(path))
    tokens = torch.randint(0, 64, (200,), generator=torch.Generator().manual_seed(1)).numpy()
    q = lm_quality(tiny_llama_tied32, path, token_ids=tokens, window=32, batch=4)
    assert q.kl_max < 1e-9 and q.top1_agreement == 1.0 and q.windows == 6
    assert q.ppl_candidate == pytest.approx(q.ppl_reference, rel=1e-6)
