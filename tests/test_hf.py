"""Hugging Face encoders: ``hf:PATH`` through Optimum (and the fallback exporter), the pooling head and
attention mask, the pretrained all-MiniLM-L6-v2 (``bert``) against sentence-transformers, an INT8
variant's cosine and recall@1, and the CLI's one-line errors for bad ``hf:`` paths."""
from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from deepship import api  # noqa: E402
from deepship.errors import UnknownModelError  # noqa: E402
from deepship.models import hf, resolve  # noqa: E402
from deepship.pipeline.arch import hf as AH  # noqa: E402

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "To be, or not to be: that is the question.",
             "A short one.", "Python's standard library is very extensive."]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A randomly initialised 2-layer BERT (hidden 32) saved with save_pretrained, plus MiniLM's tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    d = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(hf.minilm_path()), local_files_only=True)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).eval().save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def tiny_ctx(tiny_bert):
    return api.load(f"hf:{tiny_bert}")


def _torch_run(module, feeds):
    import torch

    with torch.inference_mode():
        emb, hid = module(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"]))
    return emb.numpy(), hid.numpy()


def test_hf_folder_exports_through_optimum_with_dynamic_dims_and_parity(tiny_bert, tiny_ctx, cli, tmp_path):
    code, out, err = cli("export", f"hf:{tiny_bert}", "-o", tmp_path / "tiny.onnx")
    assert code == 0, err
    assert "parity at {'input_ids': [3, 23]" in out  # the second shape: other batch and sequence
    v = api.export(tiny_ctx)
    assert v.info["exporter"].startswith("optimum.exporters.onnx")
    assert v.info["parity"]["second_shape"]["max_abs"] < 1e-4
    import onnx

    m = onnx.load(str(tmp_path / "tiny.onnx"))
    ins = {i.name: [d.dim_param for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
    assert ins == {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "seq"]}
    assert [o.name for o in m.graph.output][:2] == ["sentence_embedding", "last_hidden_state"]
    # a third shape, with real padding, against PyTorch
    from deepship.exporters.hf import padded_feeds
    from deepship.runtimes.session import OrtSession

    feeds = padded_feeds(tiny_ctx.spec, {"batch": 5, "seq": 41}, seed=3)
    got = OrtSession(tmp_path / "tiny.onnx", threads=1).run(feeds)
    emb, _ = _torch_run(tiny_ctx.module(), feeds)
    assert got["sentence_embedding"].shape == (5, 32)
    np.testing.assert_allclose(got["sentence_embedding"], emb, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got["sentence_embedding"], axis=1), 1.0, atol=1e-5)


def test_attention_mask_respected_padding_does_not_change_embedding(tiny_ctx):
    from deepship.runtimes.session import OrtSession

    s = OrtSession(api.export(tiny_ctx).path, threads=1)
    path = tiny_ctx.spec.extra["path"]
    alone = s.run(hf.tokenize(path, [SENTENCES[2]]))["sentence_embedding"][0]
    padded = s.run(hf.tokenize(path, [SENTENCES[2], SENTENCES[0]], pad_to=48))["sentence_embedding"][0]
    np.testing.assert_allclose(alone, padded, atol=1e-5)


def test_unsupported_architecture_falls_back_to_deepship_exporter(tiny_ctx, monkeypatch, caplog):
    """Optimum refusing the architecture: the export stage logs why and uses the dynamo exporter,
    with parity at the second shape; the result still respects the mask at another shape."""
    from deepship.exporters import hf as X
    from deepship.exporters.hf import padded_feeds
    from deepship.runtimes.session import OrtSession

    def unsupported(*a, **k):
        raise X.OptimumUnsupported("Optimum has no ONNX config for model type 'made-up'")

    monkeypatch.setattr(X, "optimum_export", unsupported)
    with caplog.at_level("WARNING", logger="deepship.exporters.hf"):
        v = tiny_ctx.build("fp32-onnx-fallback", "export", "onnx", {"opset": 17}, "fp32-torch")
    assert "fallback" in v.info["exporter"] and "made-up" in v.info["fallback_reason"]
    assert "falling back" in caplog.text
    assert v.info["parity"]["second_shape"]["shape"]["input_ids"] == [3, 23]
    feeds = padded_feeds(tiny_ctx.spec, {"batch": 4, "seq": 9}, seed=5)
    got = OrtSession(v.path, threads=1).run(feeds)["sentence_embedding"]
    np.testing.assert_allclose(got, _torch_run(tiny_ctx.module(), feeds)[0], atol=1e-5)


def test_minilm_export_equals_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    from deepship.runtimes.session import OrtSession

    ctx = api.load("bert")
    assert ctx.spec.recipe is None and ctx.spec.source == "hf"
    v = api.export(ctx)
    got = AH.embed(OrtSession(v.path, threads=2), ctx.spec.extra["path"], SENTENCES)
    st = SentenceTransformer(str(hf.minilm_path()), device="cpu").encode(SENTENCES, convert_to_numpy=True)
    assert got.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(got, st, atol=2e-5)


def test_minilm_int8_variant_cosine_and_recall():
    """Dynamic INT8 of the fused graph (the fast recipe; the static recipes calibrate for a minute) on a
    subset of the corpus (the full corpus is the benchmark's): cosine and recall@1 computed and sensible."""
    from deepship.runtimes.session import OrtSession, TorchSession

    ctx = api.load("bert")
    v = ctx.build_planned("int8-fused-dynamic", AH.BERT_PLAN)
    assert ctx.get("fp32-fused").info["fusions"]["Attention"] == 6
    assert v.info["nodes"]["quantized"]
    s = hf.sentences()
    texts = s["corpus"][:250] + s["queries"][:80]
    path = ctx.spec.extra["path"]
    ref = AH.embed(TorchSession(ctx.module(), ["input_ids", "attention_mask"], ctx.spec.output_names, threads=2),
                   path, texts)
    m = hf.embedding_metrics(AH.embed(OrtSession(v.path, threads=2), path, texts), ref, 250)
    assert m["cosine"] >= 0.98 and m["min_cosine"] >= 0.9 and m["recall@1"] >= 0.6, m


def test_sentence_corpus_is_deterministic_and_calibration_disjoint():
    s = hf.sentences()
    assert len(s["corpus"]) == hf.CORPUS_SIZE and len(s["queries"]) == hf.QUERY_SIZE
    assert not set(s["calibration"]) & (set(s["corpus"]) | set(s["queries"]))
    assert not set(s["corpus"]) & set(s["queries"])


@pytest.mark.parametrize("kind", ["missing", "file", "no-config", "empty"])
def test_bad_hf_paths_give_one_line_errors(kind, cli, tmp_path):
    p = tmp_path / "x"
    if kind == "file":
        p.write_text("not a folder")
    elif kind == "no-config":
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"")
    ref = "hf:" if kind == "empty" else f"hf:{p}"
    code, out, err = cli("export", ref, "-o", tmp_path / "o.onnx")
    assert code == 2
    msg = err.strip()
    assert "\n" not in msg and "Traceback" not in msg and msg
    assert ("hf:" in msg or str(p) in msg)
    with pytest.raises(UnknownModelError):
        resolve(ref)


def test_unknown_model_message_mentions_hf_paths():
    with pytest.raises(UnknownModelError, match="hf:PATH"):
        resolve("no-such-model")


def test_dynamic_padding_merges_lengths_and_equals_each_request_alone(tiny_ctx):
    """The serving batcher's ``pad_bucket``: requests of different token lengths in one bucket run as
    one padded batch; every embedding equals the request run alone, and last_hidden_state comes back
    at each request's own length."""
    import asyncio
    import threading

    from deepship.serving import BatcherConfig, DynamicBatcher, PadSpec, load_repository

    m = load_repository([f"tiny={api.export(tiny_ctx).path}"], threads=1).models["tiny"]
    pad = PadSpec.of(m.inputs, m.outputs)
    assert pad is not None and "attention_mask" in pad.inputs and pad.outputs == ("last_hidden_state",)
    assert PadSpec.of([type("T", (), {"name": "x", "dims": ("batch", 8), "dtype": "float32"})()], []) is None
    path = tiny_ctx.spec.extra["path"]
    feeds = [hf.tokenize(path, [s]) for s in SENTENCES]
    lengths = [f["input_ids"].shape[1] for f in feeds]
    assert len(set(lengths)) == 4
    seen, gate = [], threading.Event()

    def run(f):
        if not seen:
            gate.wait(10)
        seen.append(f["input_ids"].shape)
        return m.run(f)

    async def main(bucket):
        seen.clear()
        gate.clear()
        b = DynamicBatcher("tiny", run, BatcherConfig(max_batch_size=8, pad_bucket=bucket), pad=pad)
        b.start()
        first = asyncio.ensure_future(b.submit(feeds[0], 1))
        await asyncio.sleep(0.05)  # held: the rest queue up
        rest = [asyncio.ensure_future(b.submit(f, 1)) for f in feeds[1:]]
        await asyncio.sleep(0.05)
        gate.set()
        outs = await asyncio.gather(first, *rest)
        await b.stop()
        return outs

    outs = asyncio.run(main(16))
    assert seen[1] == (3, max(lengths[1:]))  # the three queued requests padded to their longest in one batch
    for f, o, n in zip(feeds, outs, lengths):
        alone = m.run(f)
        np.testing.assert_allclose(o["sentence_embedding"], alone["sentence_embedding"], atol=1e-5)
        assert o["last_hidden_state"].shape[1] == n
        np.testing.assert_allclose(o["last_hidden_state"], alone["last_hidden_state"], atol=1e-4)
    asyncio.run(main(0))
    assert len(seen) == 4  # off: only equal shapes merge, four lengths run alone
