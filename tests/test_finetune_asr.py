"""ASR personalization (issue 17): LoRA on the streaming recognizer from a voice's recordings, through
PEFT's format, merged = unmerged, the CLI and its one-line errors. The bars (CER on the voice down
>= 30%, others <= +1 point, adapter <= 100 KB) are measured by benchmarks/lora.py --only asr."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("peft")

from peft import PeftModel  # noqa: E402

from deepship.models.asr import data as S  # noqa: E402
from deepship.models.asr import voices as V  # noqa: E402
from deepship.pipeline import finetune as FT  # noqa: E402
from deepship.pipeline.arch import asr_lora as FA  # noqa: E402

needs_flite = pytest.mark.skipif(not (S.speech_tools_available()), reason="the speech synthesizers are not installed "
                                 "(make install does it)")


def write_clips(folder, texts, voice):
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, t in enumerate(texts):
        S.write_wav(folder / f"c{i}.wav", V.synthesize(t, voice))
        lines.append(f"c{i}.wav\t{t}")
    (folder / "clips.tsv").write_text("\n".join(lines) + "\n")
    return folder / "clips.tsv"


@needs_flite
def test_voice_adapter_trains_round_trips_and_merges(tmp_path, zoo_ctx):
    ctx = zoo_ctx("asr")
    voice = V.Voice("flite", "awb", 1.0)
    train = write_clips(tmp_path / "train", ["please close the window", "the kitchen lights are on", "call me back tonight",
                                             "where is my umbrella", "seven thirty in the morning", "i will be late"], voice)
    evals = write_clips(tmp_path / "eval", ["open the door please", "the morning train"], voice)
    opts = FT.LoraOptions(rank=2, alpha=4.0, targets=list(FA.ASR_TARGETS), steps=6, batch_size=3, lr=2e-3)
    r = FA.adapt_recognizer(ctx, train, opts, tmp_path / "out", evals)
    assert r["clips_n"] == 6 and r["eval_clips_n"] == 2 and r["train"]["trainable_share"] < 0.05
    assert r["merged_max_abs_diff"] < 1e-4 and r["adapter_bytes"] < 100_000
    assert set(r["before"]) == {"voice", "others"} and 0 <= r["after"]["others"] < 1
    meta = json.loads((tmp_path / "out" / "finetune.json").read_text())
    assert meta["options"]["targets"] == list(FA.ASR_TARGETS)
    # what a device downloads loads with PEFT's own loader onto the base, and gives the trained model's output
    loaded = PeftModel.from_pretrained(FT._plain_copy(ctx.module()), str(tmp_path / "out" / "adapter")).eval()
    x = torch.from_numpy(S.fbank(V.synthesize("hello there", voice))[:64][None])
    with torch.no_grad():
        a = loaded.get_base_model().forward_full(x)
        b = FT.merge(loaded).forward_full(x)
    assert float((a - b).abs().max()) < 1e-4


@needs_flite
@pytest.mark.parametrize("args,msg", [
    (["--train-data", "notes.txt"], "give a TSV"),
    (["--train-data", "{d}/missing.tsv"], "not found"),
    (["--train-data", "{d}/notext.tsv"], "has no transcript"),
    (["--train-data", "{d}/ok.tsv", "--rank", "0"], "--rank must be > 0"),
    (["--train-data", "{d}/ok.tsv", "--targets", "fc9"], "not in the model"),
])
def test_asr_finetune_cli_bad_input(cli, tmp_path, args, msg):
    (tmp_path / "notext.tsv").write_text("a.wav\n")
    (tmp_path / "ok.tsv").write_text("a.wav\thello\n")
    (tmp_path / "a.wav").write_bytes(b"")
    args = [a.format(d=tmp_path) for a in args]
    if "ok.tsv" in " ".join(args):
        write_clips(tmp_path, ["hello"], V.Voice("flite", "awb", 1.0))
        (tmp_path / "ok.tsv").write_text("c0.wav\thello\n")
    code, out, err = cli("finetune", "asr", *args, "-o", str(tmp_path / "o"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and msg in err, (code, out, err)
    assert not (tmp_path / "o").exists()
