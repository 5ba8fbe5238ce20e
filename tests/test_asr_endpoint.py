"""Endpointing for continuous use (issue 15): the energy VAD of asr_stream.Endpointer cuts a long stream
at pauses, emits one final transcript per utterance and runs the model only inside utterances. These
tests use a stand-in chunk model (it emits one letter per chunk of loud frames), so they check the
endpointing itself; tests/test_asr.py runs it with the trained recognizer on real utterances."""
from __future__ import annotations

import numpy as np
import pytest

from deepship.runtimes import asr_stream as R

SR = 16000
TOKENS = ["<blk>"] + list(" abcdefghijklmnopqrstuvwxyz'")


class LoudChunkModel:
    """Emits "a" on the first frame of a chunk whose loudest log-mel bin is high (a tone at -15 dBFS: about
    1.9; noise at -40 dBFS: below 0.5), blanks otherwise."""

    def __init__(self):
        self.calls = 0

    def run(self, feeds):
        self.calls += 1
        x = feeds["x"]
        lp = np.full((1, 1, len(TOKENS)), -10.0, np.float32)
        lp[..., 0] = 0.0
        if float(x.max()) > 1.0:
            lp[0, 0, 0], lp[0, 0, 2] = -10.0, 0.0
        out = {"log_probs": lp}
        out.update({"next_" + k: np.zeros((1, 1), np.float32) for k in R.STATE_NAMES})
        return out


def config() -> R.FeatureConfig:
    return R.FeatureConfig({"sample_rate": SR, "n_mels": 80, "frame_length_ms": 25, "frame_shift_ms": 10,
                            "chunk_frames": 4, "mean": [0.0] * 80, "state_shapes": {}, "tokens": TOKENS})


def burst(seconds: float, level_db: float, rng) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    x = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) / (i + 1) for i, f in enumerate((180, 360, 540, 1200)))
    return (x / np.sqrt(np.mean(x ** 2)) * 10 ** (level_db / 20)).astype(np.float32)


def noise(seconds: float, level_db: float, rng) -> np.ndarray:
    return (rng.standard_normal(int(seconds * SR)) * 10 ** (level_db / 20)).astype(np.float32)


def run(ep: R.Endpointer, audio: np.ndarray, piece: int = 1600) -> list[dict]:
    segs = []
    for i in range(0, len(audio), piece):
        segs += ep.accept_waveform(audio[i:i + piece], SR)
    return segs + ep.finalize()


@pytest.mark.parametrize("floor_db", [-70.0, -40.0])
def test_utterances_are_cut_at_pauses_over_a_noise_floor(floor_db):
    rng = np.random.default_rng(0)
    # speech-like bursts of 0.8, 1.2 and 0.6 s; the first two apart by 0.25 s (a pause inside a sentence),
    # then 1 s gaps; all over background noise at floor_db
    parts, spans, t = [noise(1.0, floor_db, rng)], [], 1.0
    for dur, gap in ((0.8, 0.25), (1.2, 1.0), (0.6, 1.0), (0.9, 1.5)):
        b = burst(dur, -15.0, rng) + noise(dur, floor_db, rng)
        parts += [b, noise(gap, floor_db, rng)]
        spans.append((t, t + dur))
        t += dur + gap
    audio = np.concatenate(parts)
    model = LoudChunkModel()
    segs = run(R.Endpointer(model, config()), audio)
    # the 0.25 s pause does not end the first utterance: three ends for four bursts
    assert len(segs) == 3, segs
    want = [(spans[0][0], spans[1][1]), spans[2], spans[3]]
    for seg, (a, b) in zip(segs, want):
        assert seg["text"].startswith("a")
        assert a - 0.25 <= seg["start_s"] <= a + 0.05 and b - 0.05 <= seg["end_s"] <= b + 0.1, (seg, a, b)
    # the model runs inside utterances only (plus the trailing silence), not over the long gaps
    speech_s = sum(s["end_s"] - s["start_s"] for s in segs)
    assert model.calls * 0.04 < speech_s + len(segs) * (0.5 + 0.3) + 0.5


def test_silence_and_clicks_give_no_segments_and_the_last_utterance_ends_at_finalize():
    rng = np.random.default_rng(1)
    quiet = noise(5.0, -60.0, rng)
    quiet[SR:SR + 32] += 0.5  # a 2 ms click
    model = LoudChunkModel()
    assert run(R.Endpointer(model, config()), quiet) == []
    # speech running to the end of the stream is finalized by finalize()
    ep = R.Endpointer(LoudChunkModel(), config())
    segs = ep.accept_waveform(np.concatenate([noise(0.5, -60, rng), burst(1.0, -12, rng)]), SR)
    assert segs == [] and ep.partial_result().startswith("a")
    last = ep.finalize()
    assert len(last) == 1 and last[0]["end_s"] == pytest.approx(1.5, abs=0.05)


def test_long_speech_is_cut_at_the_utterance_limit_and_memory_stays_bounded():
    rng = np.random.default_rng(2)
    ep = R.Endpointer(LoudChunkModel(), config(), max_utterance_s=1.0)
    segs = run(ep, burst(3.5, -12, rng))  # speech from the first sample on, no pause
    assert [round(s["end_s"] - s["start_s"], 1) for s in segs] == [1.0, 1.0, 1.0, 0.5], segs
    assert ep.stream is None and len(ep.buf) < SR // 100


def test_bad_audio_is_refused_in_one_line():
    ep = R.Endpointer(LoudChunkModel(), config())
    for bad, msg in ((np.zeros((10, 2), np.float32), "mono"), (np.array([np.nan], np.float32), "NaN")):
        with pytest.raises(ValueError, match=msg):
            ep.accept_waveform(bad, SR)
    with pytest.raises(ValueError, match="positive"):
        ep.accept_waveform(np.zeros(10, np.float32), 0)
