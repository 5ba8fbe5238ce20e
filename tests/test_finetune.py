"""LoRA / QLoRA (deepship.pipeline.finetune): PEFT round trip, merge, a QLoRA step on the CPU, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("peft", reason="peft is missing (pip install -e .)")
pytest.importorskip("bitsandbytes", reason="bitsandbytes is missing (pip install -e .)")

from peft import PeftModel  # noqa: E402

from deepship.errors import InputSpecError  # noqa: E402
from deepship.models.gpt.model import GPT, GPTConfig  # noqa: E402
from deepship.pipeline import finetune as FT  # noqa: E402

CFG = GPTConfig(vocab_size=64, context=32, n_layer=2, n_head=2, d_model=64)  # bitsandbytes' CPU kernel needs widths >= 64


@pytest.fixture
def base():
    torch.manual_seed(0)
    return GPT(CFG).eval()


def stream(n=4000, seed=0):
    """A token stream with structure to learn: a repeated 16-token phrase with random replacements."""
    rng = np.random.default_rng(seed)
    phrase = rng.integers(0, CFG.vocab_size, 16)
    s = np.tile(phrase, n // 16)
    flip = rng.random(len(s)) < 0.05
    s[flip] = rng.integers(0, CFG.vocab_size, flip.sum())
    return s.astype(np.int64)


def loss_of(model, ids):
    x = torch.from_numpy(ids[: 4 * 17].reshape(4, 17))
    with torch.no_grad():
        logits = model(x[:, :-1])[0]
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, CFG.vocab_size), x[:, 1:].reshape(-1)))


OPTS = dict(rank=4, alpha=8, targets=["qkv", "fc"], steps=150, lr=2e-2, batch_size=4, seq_len=16, warmup=5)


def test_lora_trains_adapters_only_and_round_trips_through_peft(base, tmp_path):
    ids = stream()
    opts = FT.LoraOptions(**OPTS)
    m = FT.lora_model(base, opts)
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    st = FT.train_lm(m, ids, opts)
    assert loss_of(m, ids) < loss_of(base, ids) - 0.5
    assert 0 < st["trainable_share"] < 0.2 and st["trainable_params"] == sum(
        p.numel() for n, p in m.named_parameters() if "lora_" in n)
    for k, v in base.state_dict().items():  # the base is untouched
        assert torch.equal(v, frozen[k])
    FT.save_adapter(m, tmp_path / "adapter", {"options": FT.options_dict(opts)})
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and sorted(cfg["target_modules"]) == ["fc", "qkv"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    # PEFT's own loader, on a fresh copy of the base
    again = PeftModel.from_pretrained(FT._plain_copy(base), str(tmp_path / "adapter")).eval()
    x = torch.from_numpy(ids[:48].reshape(3, 16))
    with torch.no_grad():
        assert torch.allclose(again(x)[0], m(x)[0], atol=1e-6)
        assert torch.allclose(FT.load_adapter(base, tmp_path / "adapter")(x)[0], m(x)[0], atol=1e-6)


def test_merged_equals_unmerged(base):
    opts = FT.LoraOptions(**{**OPTS, "steps": 20})
    m = FT.lora_model(base, opts)
    FT.train_lm(m, stream(), opts)
    merged = FT.merge(m)
    assert type(merged) is GPT and not any("lora" in n for n, _ in merged.named_modules())
    x = torch.from_numpy(stream()[:64].reshape(4, 16))
    with torch.no_grad():
        assert (merged(x)[0] - m(x)[0]).abs().max() < 1e-4
    assert any(n.endswith("lora_A") for n, _ in m.named_modules())  # merge left the adapter model as it was


def test_qlora_step_runs_on_cpu_with_nf4_base_and_merges_into_dequantized_fp32(base):
    import bitsandbytes as bnb

    ids = stream()
    opts = FT.LoraOptions(**{**OPTS, "qlora": True})
    m = FT.lora_model(base, opts)
    linears = [mod for mod in m.get_base_model().modules() if isinstance(mod, bnb.nn.Linear4bit)]
    assert len(linears) == 4 * CFG.n_layer  # every linear layer of the base is NF4, adapted or not
    assert all(q.weight.quant_state.quant_type == "nf4" and q.weight.compress_statistics for q in linears)
    st = FT.train_lm(m, ids, opts)
    assert st["total_params"] == sum(p.numel() for p in base.parameters()) + st["trainable_params"]
    assert loss_of(m, ids) < loss_of(base, ids) - 0.5
    assert FT.weight_bytes(m.get_base_model()) < FT.weight_bytes(base)
    merged = FT.merge(m)
    assert not any(isinstance(mod, bnb.nn.Linear4bit) for mod in merged.modules())
    x = torch.from_numpy(ids[:64].reshape(4, 16))
    with torch.no_grad():
        ref, got = m(x)[0], merged(x)[0]
    # NF4 rounding is the same on both sides; bitsandbytes' CPU kernel may compute the unmerged side in BF16
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


def test_bad_options_are_refused(base):
    for bad, msg in [({"rank": 0}, "--rank must be > 0"), ({"alpha": -1}, "--alpha must be > 0"),
                     ({"steps": 0}, "--steps must be > 0"), ({"targets": ["qkv", "nope"]}, "nope not in the model"),
                     ({"targets": []}, "not in the model")]:
        with pytest.raises(InputSpecError, match=msg):
            FT.LoraOptions(**{**OPTS, **bad}).check(base)
    adapted = FT.lora_model(base, FT.LoraOptions(**OPTS))
    with pytest.raises(InputSpecError, match="already carries LoRA layers"):
        FT.LoraOptions(**OPTS).check(adapted.get_base_model())
    with pytest.raises(InputSpecError, match="fewer than one window"):
        FT.train_lm(FT.lora_model(base, FT.LoraOptions(**OPTS)), np.arange(10), FT.LoraOptions(**OPTS))


def test_finetune_cli_on_a_text_file(cli, tmp_path):
    """The zoo's GPT adapted to a text it never saw (a .txt of the user's), adapter + merged weights written."""
    text = tmp_path / "notes.txt"
    para = ("The build step writes the engine file next to the model. Run the tests before you push, "
            "then open the report and read the latency column twice.\n\n")
    text.write_text(para * 300)
    out = tmp_path / "ft"
    code, stdout, stderr = cli("finetune", "gpt", "--train-data", str(text), "--steps", "25", "--rank", "2",
                                "--lr", "5e-3", "-o", str(out))
    assert code == 0, stderr
    res = json.loads((out / "finetune.json").read_text())
    assert res["after"]["domain_ppl"] < 0.6 * res["before"]["domain_ppl"]
    assert res["train"]["trainable_share"] < 0.03
    assert res["merged"]["max_abs_logit_diff_vs_unmerged"] < 1e-3
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "merged.safetensors").is_file()
    assert "held-out perplexity" in stdout


@pytest.mark.parametrize("args, msg", [
    (["mlp"], "finetune adapts the gpt decoders"),
    (["gpt", "--train-data", "data.npz"], "a decoder adapts to text, not to an .npz"),
    (["gpt", "--rank", "-1"], "--rank must be > 0"),
    (["gpt", "--targets", "qkv,attn_c"], "attn_c not in the model"),
    (["gpt", "--no-lora"], "leaves nothing to train"),
])
def test_finetune_cli_bad_input(cli, tmp_path, args, msg):
    out = tmp_path / "ft"
    code, _, stderr = cli("finetune", *args, "-o", str(out))
    assert code == 2 and msg in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not out.exists()


def test_merged_adapter_exports_with_the_kv_cache_graphs_and_matches_the_unmerged_peft_model(cli, tmp_path):
    """base -> lora -> merged -> onnx-kv: ONNX Runtime's prefill logits equal the unmerged PEFT model's."""
    import onnxruntime as ort

    from deepship.models.gpt import load_trained

    text = tmp_path / "t.txt"
    text.write_text("Adapters are small; the base model stays frozen while they learn.\n\n" * 200)
    code, _, stderr = cli("finetune", "gpt", "--train-data", str(text), "--steps", "10", "-o", str(tmp_path / "ft"))
    assert code == 0, stderr
    code, _, stderr = cli("export", "gpt", "--weights", str(tmp_path / "ft" / "merged.safetensors"), "-o",
                          str(tmp_path / "m.onnx"))
    assert code == 2 and "give a folder with -o" in stderr and not (tmp_path / "m.onnx").exists()
    code, stdout, stderr = cli("export", "gpt", "--weights", str(tmp_path / "ft" / "merged.safetensors"), "-o",
                               str(tmp_path / "onnx"))
    assert code == 0 and "KV-cache graphs" in stdout, stderr
    base, _ = load_trained("gpt")
    peft_model = FT.load_adapter(base, tmp_path / "ft" / "adapter").eval()
    ids = np.random.default_rng(0).integers(0, 1024, (2, 40)).astype(np.int64)
    sess = ort.InferenceSession(str(tmp_path / "onnx" / "prefill.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input_ids": ids})[0]
    with torch.no_grad():
        ref = peft_model(torch.from_numpy(ids))[0].numpy()
    assert np.abs(got - ref).max() <= 1e-4


def test_merged_model_is_a_cached_variant_with_its_chain_to_int4(tmp_path):
    """fp32-torch -> lora-NAME (torch, merged) -> lora-NAME-onnx (KV-cache graphs, parity) -> int4, through the cache."""
    from deepship import api

    text = tmp_path / "manual.txt"
    text.write_text("Press the left button twice to pair the hearing aid with the phone.\n\n" * 150)
    ctx = api.load("gpt")
    opts = FT.LoraOptions(steps=8)
    v = api.finetune(ctx, str(text), opts)
    assert v.name == "lora-manual" and v.format == "torch" and v.info["train"]["trainable_share"] < 0.03
    assert (Path(v.dir) / "adapter" / "adapter_config.json").is_file()
    onnx_v, int4 = api.carry_on(ctx, v, ["int4-weight-only"])
    assert onnx_v.info["parity_steps"]["ok"] and int4.format == "onnx"
    assert [x.name for x in ctx.lineage(int4)] == ["lora-manual-int4-weight-only", "lora-manual-onnx", "lora-manual",
                                                    "fp32-torch"]
    assert api.finetune(ctx, str(text), opts).key == v.key  # warm cache: the same artifact
    text.write_text(text.read_text() + "A different manual.\n")
    assert api.finetune(ctx, str(text), opts).key != v.key  # an edited text is a new variant


def test_lora_on_minilm_classifies_speaker_turns_tiny(tmp_path):
    """The MiniLM LoRA recipe on a tiny configuration: 2 speakers, 12 steps; the base stays frozen,
    the adapter saves in PEFT's format, and the scores are well-formed."""
    import torch
    from transformers import AutoModel

    from deepship.models.hf import minilm_path
    from deepship.models.hf.data import speaker_turns, tokenize

    path = minilm_path()
    encoder = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
    before = {n: p.clone() for n, p in encoder.named_parameters()}
    tr_x, tr_y, te_x, te_y, names = speaker_turns(n_speakers=2)
    tr = (tr_x[:24] + tr_x[-24:], np.concatenate([tr_y[:24], tr_y[-24:]]))
    te = (te_x[:8] + te_x[-8:], np.concatenate([te_y[:8], te_y[-8:]]))
    opts = FT.LoraOptions(rank=2, alpha=4, steps=12, batch_size=8, lr=1e-3, threads=1)
    model, res = FT.train_classifier(encoder, lambda t: tokenize(path, t, max_length=32), tr, te, opts)
    assert res["options"]["targets"] == ["query", "value"] and res["classes"] == 2
    assert 0 <= res["lora"]["accuracy"] <= 1 and 0 <= res["probe"]["accuracy"] <= 1
    assert res["train"]["trainable_share"] < 0.01 and np.isfinite(res["train"]["final_loss"])
    assert all(torch.equal(p, before[n]) for n, p in encoder.named_parameters())  # the base is not touched
    folder = FT.save_adapter(model.encoder, tmp_path / "adapter", {"model": "bert"})
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    with pytest.raises(InputSpecError, match="not in the model"):
        FT.train_classifier(encoder, lambda t: tokenize(path, t), tr, te, FT.LoraOptions(targets=["nope"], steps=1))
