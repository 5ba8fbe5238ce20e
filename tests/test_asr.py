"""Streaming ASR: model streaming equivalence, CTC decoding, export with explicit state, the corpus's
held-out sets, the Stream API, endpointing real utterances, bad audio, the bundle and the tiny training
recipe."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import wave

import numpy as np
import pytest
import torch

from deepship.models import asr as A
from deepship.models.asr import data as S
from deepship.pipeline.arch import asr as AA
from deepship.runtimes import asr_stream as R

SPEECH_SKIP = ("the corpus's synthesizers or texts are not installed (apt-get install -y espeak-ng festival "
               "festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts flite bible-kjv wamerican python3.11-doc; "
               "make install does it)")
needs_espeak = pytest.mark.skipif(not S.speech_tools_available(), reason=SPEECH_SKIP)


def _write_wav(path, x, rate=16000, channels=1):
    pcm = (np.clip(np.asarray(x, np.float32), -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


@pytest.fixture(scope="module")
def tiny_cfg():
    return A.ASRConfig(d_model=32, n_heads=2, n_layers=2, sub_channels=8, left_context=6, lstm_hidden=24, chunk=2)


@pytest.mark.parametrize("chunk", [1, 2])
def test_streaming_chunks_equal_whole_utterance(chunk):
    """Chunk by chunk with explicit state == the whole-utterance forward (the training path)."""
    torch.manual_seed(0)
    cfg = A.ASRConfig(d_model=32, n_heads=2, n_layers=2, sub_channels=8, left_context=5, lstm_hidden=24, chunk=chunk)
    m = A.StreamingConformerCTC(cfg).eval()
    x = torch.randn(3, 4 * chunk * 9, 80) * 3 - 5
    with torch.no_grad():
        full = m.forward_full(x)
        st = m.initial_state(3)
        outs = []
        for c in range(9):
            r = m(x[:, c * 4 * chunk:(c + 1) * 4 * chunk], *st.values())
            outs.append(r[0])
            st = dict(zip(A.STATE_NAMES, r[1:]))
    assert full.shape == (3, 9 * chunk, cfg.vocab)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=2e-5, rtol=1e-4)
    # causal: changing the last chunk changes nothing before it
    x2 = x.clone()
    x2[:, -4 * chunk:] += 10
    with torch.no_grad():
        full2 = m.forward_full(x2)
    torch.testing.assert_close(full2[:, :-chunk], full[:, :-chunk])
    assert not torch.allclose(full2[:, -chunk:], full[:, -chunk:])


def test_ctc_greedy_collapses_repeats_and_drops_blanks():
    V = 5
    seq = [1, 1, 0, 1, 2, 2, 0, 0, 3]
    lp = np.log(np.full((len(seq), V), 0.01))
    lp[np.arange(len(seq)), seq] = np.log(0.96)
    assert R.ctc_greedy(lp)[0] == [1, 1, 2, 3]
    # streaming: the repeat across a call boundary collapses too
    a, prev = R.ctc_greedy(lp[:5])
    b, _ = R.ctc_greedy(lp[5:], prev)
    assert a + b == [1, 1, 2, 3]


def _brute_force_ctc_best(lp: np.ndarray) -> tuple[tuple, float]:
    """Most probable label sequence by summing all alignments (tiny T and V only)."""
    import itertools

    T, V = lp.shape
    scores: dict[tuple, float] = {}
    for path in itertools.product(range(V), repeat=T):
        labels, prev = [], 0
        for s in path:
            if s != prev and s != 0:
                labels.append(s)
            prev = s
        p = float(sum(lp[t, s] for t, s in enumerate(path)))
        k = tuple(labels)
        scores[k] = np.logaddexp(scores.get(k, -math.inf), p)
    return max(scores.items(), key=lambda kv: kv[1])


def test_prefix_beam_search_finds_the_most_probable_labelling():
    """Where greedy (best path) and the best labelling differ, the beam search finds the labelling."""
    rng = np.random.default_rng(3)
    found_difference = False
    for _ in range(30):
        lp = np.log(rng.dirichlet(np.ones(3) * 0.7, size=5))
        best, _ = _brute_force_ctc_best(lp)
        beam = tuple(R.ctc_prefix_beam_search(lp, beam=16, prune=-math.inf))
        assert beam == best
        found_difference |= tuple(R.ctc_greedy(lp)[0]) != best
    assert found_difference, "the random cases never separated greedy from the beam search"


def test_char_lm_is_normalized_round_trips_and_steers_the_beam(tmp_path):
    """Witten-Bell distributions sum to 1 in every context, save/load keeps them, and where the acoustics
    cannot tell "cat" from "kat" the fused beam search picks the spelling the text knows."""
    chars = S.CHARS
    lm = R.CharLM.build(["the cat sat", "a cat ran", "my cat is here", "cats and dogs"], chars, order=3)
    for ctx in ("", "ca", "zq", "the c"):
        total = sum(math.exp(lm.logp(ctx, c)) for c in chars)
        assert abs(total - 1) < 0.1, (ctx, total)  # quantized to 0.05 nats
    assert lm.logp("ca", "t") > lm.logp("ca", "k") and lm.logp("zq", "a") < 0
    lm.save(tmp_path / "lm.npz")
    lm2 = R.CharLM.load(tmp_path / "lm.npz")
    assert all(lm2.logp(h, c) == lm.logp(h, c) for h in ("", "ca", "xy") for c in chars)
    tok = S.VOCAB
    lp = np.full((3, len(tok)), -8.0)
    lp[0, tok.index("c")] = lp[0, tok.index("k")] = math.log(0.5)  # a tie between c and k
    lp[1, tok.index("a")] = lp[2, tok.index("t")] = 0.0
    with_lm = R.ctc_prefix_beam_search(lp, beam=8, lm=lm, tokens=tok, alpha=1.0, beta=0.0)
    assert S.decode_labels(with_lm) == "cat"
    lp[0, tok.index("k")] += 0.01  # k slightly ahead acoustically: without the LM the beam takes it
    assert S.decode_labels(R.ctc_prefix_beam_search(lp, beam=8)) == "kat"
    assert S.decode_labels(R.ctc_prefix_beam_search(lp, beam=8, lm=lm, tokens=tok, alpha=1.0, beta=0.0)) == "cat"


def test_export_has_explicit_state_and_streams_like_torch(tmp_path, tiny_cfg):
    from deepship.exporters.onnx import export_onnx
    from deepship.pipeline.parity import parity

    torch.manual_seed(1)
    m = A.StreamingConformerCTC(tiny_cfg).eval()
    spec = A.asr_spec().replace(inputs=A.input_specs(tiny_cfg), extra={"config": tiny_cfg.to_dict()})
    res = export_onnx(m, spec, tmp_path / "asr.onnx")
    res.parity = parity(m, spec, res.path)
    assert res.parity["ok"] and res.parity["second_shape"]["shape"]["x"][0] == 3
    import onnx

    g = onnx.load(str(tmp_path / "asr.onnx")).graph
    assert [i.name for i in g.input] == ["x"] + A.STATE_NAMES
    assert [o.name for o in g.output] == A.OUTPUT_NAMES
    from deepship.runtimes.asr_stream import OrtModel

    ort_model = OrtModel(tmp_path / "asr.onnx")
    feats = [np.random.default_rng(i).normal(-5, 3, (n, 80)).astype(np.float32) for i, n in enumerate([37, 64, 9])]
    mean = np.zeros(80, np.float32)
    got = A.stream_batch(ort_model.run, feats, tiny_cfg, mean)
    with torch.no_grad():
        for f, lp in zip(feats, got):
            x = torch.from_numpy(A.pad_frames(f, mean, tiny_cfg.chunk_frames))[None]
            want = m.forward_full(x)[0, :len(lp)].numpy()
            assert lp.shape == (math.ceil(len(f) / 4), tiny_cfg.vocab)
            np.testing.assert_allclose(lp, want, atol=1e-4)


# ---- with the trained model -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_session():
    from deepship.runtimes.session import TorchSession

    return TorchSession(A.trained(), [t.name for t in A.input_specs(A.DEFAULT)], A.OUTPUT_NAMES, threads=1)


@pytest.fixture(scope="module")
def corpus():
    if not S.speech_tools_available():
        pytest.skip(SPEECH_SKIP)
    return S.corpus(A.RECIPE["corpus"])


def test_held_out_sets_have_unseen_words_voices_and_synthesizer():
    """The recipe's text plan and voices (the tiny corpus: the real one's training part takes minutes)."""
    from deepship.models.asr import text as T
    from deepship.models.asr import voices as V

    if not S.speech_tools_available():
        pytest.skip(SPEECH_SKIP)
    plan = T.text_plan()
    vocab = {w for t in plan["train"] for w in t.split()}
    assert len(plan["train"]) == sum(T.TEXT_COUNTS.values()) and len(vocab) > 5000
    assert all(set(s.split()) - vocab for s in plan["sentences"] + plan["unseen_synth"])  # each has a new word
    assert not set(plan["sentences"]) & set(plan["unseen_synth"]) and not set(plan["words"]) & vocab
    assert sum(len(t.split()) == 1 for t in plan["train"]) >= 2000  # isolated words are trained on too
    c = S.corpus(S.TINY_RECIPE)
    engines = lambda part: {v.split(":")[0] for v in part.voices}  # noqa: E731
    assert engines(c.train) == {"espeak", "festival"} and engines(c.sets["unseen_synth"]) == {"flite"}
    assert engines(c.sets["words"]) == {"espeak", "festival", "flite"}
    espeak_variants = lambda part: {v.split("+")[1] for v in part.voices if v.startswith("espeak")}  # noqa: E731
    assert espeak_variants(c.test) <= set(V.TEST_VARIANTS) and not espeak_variants(c.train) & set(V.TEST_VARIANTS)
    snr = c.train.snr_db
    assert np.isfinite(snr).any() and (snr[np.isfinite(snr)] <= 21).all() and (snr[np.isfinite(snr)] >= -1).all()


def test_trained_model_recognizes_held_out_sentences_and_unseen_synthesizer(corpus, trained_session):
    er = AA.evaluate_cer(trained_session, limit=60)
    # regression guards at the measured level (42% and 54% CER on all 200 in FP32; the template
    # recognizer scores 77% on these texts); the bars are measured by benchmarks/asr.py
    assert er["cer"] < 0.5, er
    er = AA.evaluate_cer(trained_session, limit=60, part="unseen_synth")
    assert er["cer"] < 0.62, er


def test_isolated_words_do_not_collapse_to_one_prefix(corpus, trained_session):
    """The issue's symptom: every word heard as the opening of a template ("cur..."). The share of
    distinct first characters of the transcripts must be close to the references'."""
    words = corpus.sets["words"]
    hyps = AA.transcribe_set(trained_session, "words", limit=150)
    div = AA.first_char_diversity(hyps, words.texts[:150])
    assert div["ratio"] >= 0.8, (div, hyps[:20])
    assert AA.error_rates(hyps, words.texts[:150])["cer"] < 0.65


def test_stream_api_in_odd_pieces_equals_whole_file(corpus, trained_session):
    """Feeding audio in 37 ms, 100 ms or all-at-once pieces gives the same transcript and frames."""
    fc = R.FeatureConfig(A.feature_config())
    audio = corpus.test_audio[3]
    texts, frames = [], []
    for piece in (len(audio), 1600, 592):
        st = R.Stream(trained_session, fc)
        for i in range(0, len(audio), piece):
            st.accept_waveform(audio[i:i + piece], 16000)
            assert isinstance(st.partial_result(), str)
        texts.append(st.finalize())
        frames.append(np.concatenate(st.log_probs))
    assert texts[0] == texts[1] == texts[2]
    np.testing.assert_allclose(frames[1], frames[0], atol=1e-4)
    np.testing.assert_allclose(frames[2], frames[0], atol=1e-4)
    # and equals the batched whole-utterance evaluation path on the same fbank
    lp = A.stream_batch(trained_session.run, [S.fbank(audio)], A.DEFAULT, A.feature_mean())[0]
    np.testing.assert_allclose(frames[0], lp, atol=1e-4)
    beam = st.finalize(beam=8)
    assert isinstance(beam, str) and beam


def test_stream_rejects_misuse(trained_session):
    st = R.Stream(trained_session, R.FeatureConfig(A.feature_config()))
    with pytest.raises(ValueError, match="mono"):
        st.accept_waveform(np.zeros((10, 2), np.float32), 16000)
    with pytest.raises(ValueError, match="NaN"):
        st.accept_waveform(np.array([0.0, np.nan], np.float32), 16000)
    assert st.finalize() == ""
    with pytest.raises(ValueError, match="finalized"):
        st.accept_waveform(np.zeros(10, np.float32), 16000)


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "deepship.cli", *args], capture_output=True, text=True, timeout=timeout)


@needs_espeak
def test_endpointing_splits_a_long_recording_into_its_utterances(tmp_path, corpus, trained_session):
    """Three held-out utterances with pauses of 1.2 s over room noise at about 40 dB below the speech: the
    Endpointer emits three finals, one per utterance; the CLI prints them with times."""
    import jiwer

    rng = np.random.default_rng(0)
    idx = [1, 4, 7]
    gap = lambda s: (rng.standard_normal(int(s * 16000)) * 0.003).astype(np.float32)  # noqa: E731
    parts = [gap(0.7)]
    for i in idx:
        a = corpus.test_audio[i]
        parts += [a + gap(len(a) / 16000), gap(1.2)]
    audio = np.concatenate(parts)
    fc = R.FeatureConfig(A.feature_config())
    ep = R.Endpointer(trained_session, fc)
    segs = []
    for k in range(0, len(audio), 1600):
        segs += ep.accept_waveform(audio[k:k + 1600], 16000)
    segs += ep.finalize()
    alone = [R.transcribe(trained_session, fc, corpus.test_audio[i], 16000) for i in idx]
    refs = [corpus.test.texts[i] for i in idx]
    assert len(segs) == 3, (segs, alone)
    # each segment is its utterance (not a neighbour's or a cut part): as close to the reference as the
    # utterance transcribed alone, give or take (the pre-roll changes the onset the model hears)
    for seg, want, ref in zip(segs, alone, refs):
        assert jiwer.cer(ref, seg["text"]) < min(0.7, jiwer.cer(ref, want) + 0.15), (seg, want, ref)
    assert segs[0]["start_s"] < 0.7 + 0.05 and segs[1]["start_s"] > segs[0]["end_s"] + 0.8
    wav = _write_wav(tmp_path / "long.wav", audio)
    r = _cli("asr", "transcribe", str(wav), "--endpoint", "--variant", "fp32-torch")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3 and all("\t" in ln and "-" in ln.split("\t")[0] for ln in lines), r.stdout


@needs_espeak
def test_transcribe_bad_audio_gives_clear_errors_or_empty_results(tmp_path, corpus):
    speech = corpus.test_audio[0]
    ref = corpus.test.texts[0]
    cases = {
        "empty.wav": (_write_wav(tmp_path / "empty.wav", np.zeros(0)), "error", "no samples"),
        "text.wav": (tmp_path / "text.wav", "error", "cannot read"),
        "missing.wav": (tmp_path / "missing.wav", "error", "not found"),
    }
    (tmp_path / "text.wav").write_text("this is not audio")
    for name, (path, kind, msg) in cases.items():
        r = _cli("asr", "transcribe", str(path), "--variant", "fp32-torch")
        assert r.returncode == 2, (name, r.stdout, r.stderr)
        err = r.stderr.strip().splitlines()
        assert len(err) == 1 and msg in err[0], (name, r.stderr)
    import soxr

    from deepship import api

    silent = _write_wav(tmp_path / "silent.wav", np.zeros(32000))
    assert api.transcribe(silent, variant="fp32-torch")["text"] == ""
    clipped = _write_wav(tmp_path / "clipped.wav", np.clip(speech * 20, -1, 1))
    assert isinstance(api.transcribe(clipped, variant="fp32-torch")["text"], str)
    # 8 kHz stereo: resampled and mixed down, still recognized
    x8 = soxr.resample(speech, 16000, 8000)
    stereo = _write_wav(tmp_path / "8k.wav", np.stack([x8, x8], 1).reshape(-1), rate=8000, channels=2)
    import jiwer

    direct = api.transcribe(_write_wav(tmp_path / "16k.wav", speech), variant="fp32-torch")["text"]
    assert jiwer.cer(ref, direct) < 0.7, (ref, direct)
    for stream in (False, True):  # 8 kHz keeps half the band: close to the 16 kHz transcript, not equal
        text = api.transcribe(stereo, variant="fp32-torch", stream=stream)["text"]
        assert jiwer.cer(direct, text) < 0.5, (direct, text)
    # very long: refused without --stream, streamed block by block with it
    long = tmp_path / "long.wav"
    with wave.open(str(long), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(np.zeros(8000 * 601, "<i2").tobytes())
    r = _cli("asr", "transcribe", str(long), "--variant", "fp32-torch")
    assert r.returncode == 2 and "601 s long" in r.stderr and "--stream" in r.stderr


@needs_espeak
def test_transcribe_a_folder_writes_a_tsv_and_names_unreadable_files(tmp_path, corpus):
    import csv

    from deepship import api

    folder = tmp_path / "clips"
    folder.mkdir()
    for i in (0, 1):
        _write_wav(folder / f"utt{i}.wav", corpus.test_audio[i])
    (folder / "broken.wav").write_text("not audio")
    (folder / "notes.txt").write_text("not an audio file name: skipped")
    tsv = tmp_path / "out" / "transcripts.tsv"
    r = _cli("asr", "transcribe", str(folder), "--variant", "fp32-torch", "--tsv", str(tsv))
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(tsv.open(encoding="utf-8"), delimiter="\t"))
    assert [x["file"] for x in rows] == ["broken.wav", "utt0.wav", "utt1.wav"]
    assert rows[0]["error"] and not rows[0]["text"] and "3 files, 1 unreadable" in r.stderr
    import jiwer

    for i in (0, 1):  # each file's own transcript, as one-file transcription gives it
        want = api.transcribe(folder / f"utt{i}.wav", variant="fp32-torch")["text"]
        assert not rows[i + 1]["error"] and rows[i + 1]["text"] == want and jiwer.cer(corpus.test.texts[i], want) < 0.7
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _cli("asr", "transcribe", str(empty), "--variant", "fp32-torch")
    assert r.returncode == 2 and "holds no WAV/FLAC/OGG file" in r.stderr


@needs_espeak
def test_bundle_runs_with_onnxruntime_numpy_and_fbank_only(tmp_path, corpus):
    from deepship import api

    res = api.asr_bundle(tmp_path / "bundle", measure=False)  # the deployed INT8 variant
    files = set(res["files"])
    assert files == {"model.onnx", "features.json", "tokens.txt", "asr_stream.py", "README.md", "lm.npz"}
    assert res["size_bytes"] < 2 * 2**20
    feats = json.loads((tmp_path / "bundle" / "features.json").read_text())
    assert feats["tokens"][0] == "<blk>" and feats["chunk_ms"] == 40
    wav = _write_wav(tmp_path / "utt.wav", corpus.test_audio[2])
    # the runner in a fresh interpreter that cannot import deepship or torch
    code = ("import sys; sys.modules['torch'] = None; sys.modules['deepship'] = None; "
            "sys.argv = ['asr_stream.py', 'model.onnx', 'features.json', %r]; "
            "exec(open('asr_stream.py').read())" % str(wav))
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path / "bundle", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # the same text as deepship's own streaming of that INT8 model (the runner feeds 100 ms pieces)
    v = api.asr_variant(api.load("asr"), api.ASR_DEPLOY_VARIANT)
    sess = api.load("asr").session(v, threads=1)
    pcm = (np.clip(corpus.test_audio[2], -1, 1) * 32767).astype("<i2").astype(np.float32) / 32768  # as in the WAV
    want = R.transcribe(sess, R.FeatureConfig(A.feature_config()), pcm, 16000, chunk_samples=1600)
    assert r.stdout.strip() == want
    import jiwer

    assert jiwer.cer(corpus.test.texts[2], want) < 0.7, (corpus.test.texts[2], want)  # it heard speech
    lm = R.CharLM.load(tmp_path / "bundle" / "lm.npz")  # the bundle's LM loads with numpy alone
    assert lm.order == AA.LM_ORDER and lm.logp("th", "e") > lm.logp("th", "q")
    # unreadable input to the bundle's runner: one line on stderr, exit status 1, no traceback
    (tmp_path / "notes.wav").write_text("not audio")
    for bad in (tmp_path / "notes.wav", tmp_path / "missing.wav", tmp_path):
        code = ("import sys; sys.argv = ['asr_stream.py', 'model.onnx', 'features.json', %r]; "
                "exec(open('asr_stream.py').read())" % str(bad))
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path / "bundle", capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "not a readable 16-bit PCM WAV" in r.stderr
    # a second bundle into the same folder replaces it atomically; a file in the way is refused
    (tmp_path / "afile").write_text("x")
    r = _cli("asr", "bundle", "--out", str(tmp_path / "afile"), "--no-measure")
    assert r.returncode == 2 and "not a folder" in r.stderr


@needs_espeak
def test_training_recipe_runs_tiny_and_learns(tiny_cfg):
    """The seeded recipe on a tiny corpus and model: the CTC loss falls, and it is deterministic."""
    tiny = S.corpus(S.TINY_RECIPE)
    # from scratch (the warm start needs the full-size model: the next test)
    recipe = {**A.RECIPE, "arch": tiny_cfg.to_dict(), "epochs": 3, "batch_size": 8, "lr": 3e-3, "init": None}
    from deepship.models.train import seed_everything

    seed_everything(0)  # as train_model does before building
    m = A._build(recipe["arch"])
    stats = A.train_asr(m, tiny, recipe)
    assert stats["train_s"] > 0 and np.isfinite(stats["final_loss"])
    assert stats["epoch_losses"][-1] < stats["epoch_losses"][0]
    seed_everything(0)
    m2 = A._build(recipe["arch"])
    A.train_asr(m2, tiny, recipe)
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)


@needs_espeak
def test_training_recipe_warm_starts_from_the_template_recognizer():
    """The committed recipe starts from asr-templates.safetensors: one epoch on the tiny corpus loads it
    into the full-size model (CMVN recomputed on the new data) and moves the weights only a little."""
    from deepship.models.train import PACKAGED_WEIGHTS, load_weights, seed_everything

    tiny = S.corpus(S.TINY_RECIPE)
    recipe = {**A.RECIPE, "epochs": 1, "batch_size": 16}
    assert recipe["init"] == "asr-templates"
    seed_everything(0)
    m = A._build(recipe["arch"])
    stats = A.train_asr(m, tiny, recipe)
    init = load_weights(A._build(recipe["arch"]), PACKAGED_WEIGHTS / "asr-templates.safetensors")
    w, w0 = m.head.weight.detach(), init.head.weight.detach()
    assert np.isfinite(stats["final_loss"]) and 0 < float((w - w0).abs().max()) < 0.1 * float(w0.abs().max())
    assert not torch.equal(m.mean, init.mean)  # the statistics of the new corpus


# ---- serving: the WebSocket streaming endpoint -------------------------------------------------------

@pytest.fixture(scope="module")
def asr_server(zoo_ctx, corpus):
    from deepship import api
    from deepship.serving import InferenceServer, ServerConfig, load_repository, start_in_thread

    v = api.asr_variant(zoo_ctx("asr"), "fp32-onnx")
    repo = load_repository([f"asr={v.path}"])
    srv = InferenceServer(repo, ServerConfig(port=0, threads=1))
    with start_in_thread(srv) as running:
        yield running, v


def _ws_transcribe(url: str, audio: np.ndarray, rate: int = 16000, fmt: str = "f32le", piece_s: float = 0.1):
    from websockets.sync.client import connect

    msgs = []
    with connect(url, open_timeout=30, close_timeout=30) as ws:
        ws.send(json.dumps({"sample_rate": rate, "format": fmt}))
        step = int(rate * piece_s)
        for i in range(0, len(audio), step):
            x = audio[i:i + step]
            ws.send(x.astype("<f4").tobytes() if fmt == "f32le" else (x * 32767).astype("<i2").tobytes())
        ws.send(json.dumps({"event": "end"}))
        for m in ws:
            msgs.append(json.loads(m))
    return msgs


@needs_espeak
def test_websocket_stream_gives_partials_then_the_direct_final_result(asr_server, corpus):
    running, v = asr_server
    url = running.url.replace("http://", "ws://") + "/v2/models/asr/stream"
    audio = corpus.test_audio[5]
    msgs = _ws_transcribe(url, audio)
    assert msgs[-1]["final"] is True and all(m["final"] is False for m in msgs[:-1]) and len(msgs) >= 3
    direct = R.transcribe(api_session(v), R.FeatureConfig(A.feature_config()), audio, 16000)
    assert msgs[-1]["text"] == direct
    assert msgs[-1]["text"].startswith(msgs[-2]["text"][:max(len(msgs[-2]["text"]) - 3, 0)])
    # 8 kHz int16 is resampled by the server
    import soxr

    x8 = soxr.resample(audio, 16000, 8000)
    msgs8 = _ws_transcribe(url, x8, rate=8000, fmt="s16le")
    direct8 = R.transcribe(api_session(v), R.FeatureConfig(A.feature_config()), S.resample(x8, 8000), 16000)
    import jiwer

    assert jiwer.cer(direct8, msgs8[-1]["text"]) < 0.1, (direct8, msgs8[-1]["text"])


@needs_espeak
def test_concurrent_streams_are_batched_and_independent(asr_server, corpus):
    """Eight streams at once: each gets its own utterance's transcript; chunks were batched."""
    from concurrent.futures import ThreadPoolExecutor

    running, v = asr_server
    url = running.url.replace("http://", "ws://") + "/v2/models/asr/stream"
    sess = api_session(v)
    fc = R.FeatureConfig(A.feature_config())
    utts = [corpus.test_audio[i] for i in range(8)]
    with ThreadPoolExecutor(8) as ex:
        finals = list(ex.map(lambda a: _ws_transcribe(url, a, piece_s=0.04)[-1]["text"], utts))
    direct = [R.transcribe(sess, fc, a, 16000) for a in utts]
    import jiwer

    # batched rows may differ from batch-1 runs in float rounding, which can flip a near-tie argmax
    for got, want in zip(finals, direct):
        assert jiwer.cer(want, got) <= 0.05, (want, got)
    assert sum(g == w for g, w in zip(finals, direct)) >= 6
    metrics = urllib_get(running.url + "/metrics")
    sizes = [ln for ln in metrics.splitlines() if ln.startswith('deepship_batch_size_sum{model="asr"}')]
    counts = [ln for ln in metrics.splitlines() if ln.startswith('deepship_batch_size_count{model="asr"}')]
    assert float(sizes[0].split()[-1]) > float(counts[0].split()[-1]), "no two chunks were ever batched together"


@needs_espeak
def test_websocket_bad_input_is_refused_with_a_message(asr_server):
    from websockets.sync.client import connect

    running, _ = asr_server
    base = running.url.replace("http://", "ws://")
    for path, first, code in [("/v2/models/nope/stream", None, 1008),
                              ("/v2/models/asr/stream", "not json", 1003),
                              ("/v2/models/asr/stream", json.dumps({"sample_rate": -5}), 1003),
                              ("/v2/models/asr/stream", b"\x00\x01\x02", 1003)]:
        with connect(base + path, open_timeout=30) as ws:
            if first is not None:
                ws.send(first)
            msg = json.loads(ws.recv(timeout=30))
            assert "error" in msg and len(msg["error"].splitlines()) == 1, msg
            with pytest.raises(Exception):
                ws.recv(timeout=30)
            assert ws.close_code == code, (path, ws.close_code)
    # still serving
    assert "asr" in urllib_get(running.url + "/v2/models/asr")


def api_session(v):
    from deepship import api

    return api.load("asr").session(v, threads=1)


def urllib_get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read().decode()
