"""Voices and acoustics of the recognizer's corpus: three speech synthesizers and seeded augmentation.

Synthesizers (Debian packages, offline):

- ``espeak``: ``espeak-ng``, a formant synthesizer: 7 English accents x voice variants, speed 130-210
  words/min, pitch 25-75;
- ``festival``: Festival's ``text2wave`` with the diphone voices ``kal_diphone`` and ``ked_diphone``
  (``festvox-kallpc16k``, ``festvox-kdlpc16k``) and the HTS voice ``cmu_us_slt_arctic_hts``
  (``festvox-us-slt-hts``), all built from recordings of real speakers; duration stretch 0.8-1.25;
- ``flite``: CMU Flite's ``cmu_us_*`` voices ``kal``, ``kal16``, ``awb``, ``rms``, ``slt``; duration
  stretch 0.8-1.25, pitch mean 80-180 Hz for the male voices.

:data:`TRAIN_ENGINES` speak the training set; Flite is never heard in training and speaks the
unseen-synthesizer test set (its ``awb`` and ``rms`` speakers are recorded in no other voice here;
``kal`` and ``slt`` are the speakers of two Festival voices, synthesized another way).

Augmentation (:class:`Augmenter`, training only): speed perturbation 0.9-1.1 (resampling, Ko et al.
2015), room reverberation from ``pyroomacoustics`` shoebox room impulse responses (image source method),
microphone-like EQ, band-limiting and gain from ``audiomentations``, coloured noise at 0-20 dB SNR
(``audiomentations.AddColorNoise``), and leading and trailing silence.
"""
from __future__ import annotations

import random
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import DataError

SAMPLE_RATE = 16000
#: espeak-ng English accents (``espeak-ng --voices=en``)
ACCENTS = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029"]
#: espeak-ng voice variants heard in training, and the held-out ones heard only in the test sets
TRAIN_VARIANTS = ["m1", "m2", "m3", "m4", "m6", "m8", "f1", "f2", "f4", "klatt", "klatt3", "david", "john", "Andy"]
TEST_VARIANTS = ["m7", "f3", "f5", "klatt2", "Annie", "edward"]
FESTIVAL_VOICES = ["kal_diphone", "ked_diphone", "cmu_us_slt_arctic_hts"]
FLITE_VOICES = ["kal", "kal16", "awb", "rms", "slt"]
#: synthesizer -> share of the training utterances it speaks
TRAIN_ENGINES = {"espeak": 0.6, "festival": 0.4}
UNSEEN_ENGINE = "flite"
#: synthesizer -> its program, and the Debian packages that install it
PROGRAMS = {"espeak": "espeak-ng", "festival": "text2wave", "flite": "flite"}
PACKAGES = {"espeak": "espeak-ng", "festival": "festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts",
        "flite": "flite"}


@dataclass(frozen=True)
class Voice:
    """One rendition's voice: ``engine`` (espeak, festival, flite), ``name`` (espeak: ``accent+variant``),
    ``rate`` (duration stretch; espeak: words/min) and ``pitch`` (espeak 0-99; flite: mean F0 in Hz; 0 = the voice's own)."""

    engine: str
    name: str
    rate: float
    pitch: int = 0

    @property
    def label(self) -> str:
        return f"{self.engine}:{self.name}"


def available(engine: str) -> bool:
    """Whether ``engine``'s program is installed."""
    return shutil.which(PROGRAMS[engine]) is not None


def require(engines) -> None:
    """Raises :class:`DataError` naming the Debian packages of any engine in ``engines`` that is missing."""
    missing = [e for e in engines if not available(e)]
    if missing:
        pkgs = " ".join(PACKAGES[e] for e in missing)
        raise DataError(f"{', '.join(PROGRAMS[e] for e in missing)} not installed; the ASR corpus needs it: "
                        f"apt-get install -y {pkgs} (make install does it)")


def pick_voice(engine: str, rng: np.random.Generator, held_out: bool = False) -> Voice:
    """A random voice of ``engine`` (espeak: training or held-out variants)."""
    if engine == "espeak":
        v = f"{rng.choice(ACCENTS)}+{rng.choice(TEST_VARIANTS if held_out else TRAIN_VARIANTS)}"
        return Voice("espeak", v, int(rng.integers(130, 211)), int(rng.integers(25, 76)))
    if engine == "festival":
        return Voice("festival", str(rng.choice(FESTIVAL_VOICES)), round(float(rng.uniform(0.8, 1.25)), 2))
    name = str(rng.choice(FLITE_VOICES))
    pitch = int(rng.integers(80, 181)) if name in ("kal", "kal16", "awb", "rms") and rng.random() < 0.5 else 0
    return Voice("flite", name, round(float(rng.uniform(0.8, 1.25)), 2), pitch)


def _read_wav(path: Path, what: str) -> np.ndarray:
    import soundfile as sf

    try:
        x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception:
        raise DataError(f"{what} wrote no readable audio") from None
    return resample(x.mean(axis=1), int(sr))


def synthesize(text: str, voice: Voice) -> np.ndarray:
    """Speak ``text`` with ``voice``; float32 ``(samples,)`` at 16 kHz in [-1, 1].

    Raises:
        DataError: the synthesizer is not installed or fails (the message names the package).
    """
    require([voice.engine])
    exe = shutil.which(PROGRAMS[voice.engine])
    if voice.engine == "espeak":
        p = subprocess.run([exe, "-v", voice.name, "-s", str(int(voice.rate)), "-p", str(voice.pitch), "--stdout", text],
                           capture_output=True, timeout=60)
        if p.returncode != 0 or len(p.stdout) <= 44:
            raise DataError(f"espeak-ng failed for voice {voice.name}: {p.stderr.decode(errors='replace')[:120]}")
        # espeak-ng's --stdout WAV header carries no valid length: PCM s16le mono 22050 Hz after 44 bytes
        pcm = np.frombuffer(p.stdout[44:len(p.stdout) - (len(p.stdout) - 44) % 2], dtype="<i2").astype(np.float32) / 32768
        return resample(pcm, 22050)
    with tempfile.TemporaryDirectory() as td:
        out = Path(td) / "out.wav"
        if voice.engine == "festival":
            cmd = [exe, "-eval", f"(voice_{voice.name})", "-eval", f"(Parameter.set 'Duration_Stretch {voice.rate})",
                   "-o", str(out)]
            p = subprocess.run(cmd, input=text.encode(), capture_output=True, timeout=120)
        else:
            cmd = [exe, "-voice", voice.name, "--setf", f"duration_stretch={voice.rate}"]
            cmd += ["--setf", f"int_f0_target_mean={voice.pitch}"] if voice.pitch else []
            p = subprocess.run(cmd + ["-t", text, "-o", str(out)], capture_output=True, timeout=120)
        if p.returncode != 0 or not out.is_file():
            raise DataError(f"{PROGRAMS[voice.engine]} failed for voice {voice.name}: {p.stderr.decode(errors='replace')[:120]}")
        return _read_wav(out, f"{PROGRAMS[voice.engine]} ({voice.name})")


def resample(x: np.ndarray, sr_in: int, sr_out: int = SAMPLE_RATE) -> np.ndarray:
    """Resample float32 mono audio with ``soxr`` (high quality); a no-op when the rates agree."""
    if sr_in == sr_out:
        return np.asarray(x, np.float32)
    import soxr

    return soxr.resample(np.asarray(x, np.float32), sr_in, sr_out).astype(np.float32)


def room_impulse_responses(n: int, seed: int) -> list[np.ndarray]:
    """``n`` room impulse responses (float32, 16 kHz, peak 1) of random shoebox rooms 3-9 m wide with
    RT60 0.15-0.6 s, source and microphone placed at random (``pyroomacoustics``, image source method)."""
    import pyroomacoustics as pra

    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        dims = rng.uniform([3, 3, 2.4], [9, 7, 3.5])
        rt60 = float(rng.uniform(0.15, 0.6))
        try:
            absorption, max_order = pra.inverse_sabine(rt60, dims)
        except ValueError:  # a room too large for that RT60
            continue
        room = pra.ShoeBox(dims, fs=SAMPLE_RATE, materials=pra.Material(absorption), max_order=min(max_order, 12))
        room.add_source(rng.uniform(0.5, dims - 0.5))
        room.add_microphone(rng.uniform(0.5, dims - 0.5))
        room.compute_rir()
        h = np.asarray(room.rir[0][0], np.float32)
        out.append(h / (np.abs(h).max() + 1e-9))
    return out


class Augmenter:
    """Seeded training-audio augmentation (see the module docstring); ``self(x, i)`` augments float32
    16 kHz ``x`` as utterance ``i`` (the same ``i`` always gives the same result).

    ``clean_fraction`` of the utterances get no noise; ``snr_db`` is the noise range (dB)."""

    def __init__(self, seed: int, clean_fraction: float = 0.2, snr_db=(0.0, 20.0), rir_fraction: float = 0.3):
        import audiomentations as am

        self.seed, self.clean_fraction, self.rir_fraction = seed, clean_fraction, rir_fraction
        self.rirs = room_impulse_responses(24, seed)
        self.mic = am.Compose([
            am.SevenBandParametricEQ(min_gain_db=-8.0, max_gain_db=8.0, p=0.4),
            am.HighPassFilter(min_cutoff_freq=60.0, max_cutoff_freq=400.0, p=0.3),
            am.LowPassFilter(min_cutoff_freq=3000.0, max_cutoff_freq=7500.0, p=0.3),
            am.Gain(min_gain_db=-12.0, max_gain_db=6.0, p=0.5),
        ])
        self.noise = am.AddColorNoise(min_snr_db=float(snr_db[0]), max_snr_db=float(snr_db[1]), p=1.0)

    def __call__(self, x: np.ndarray, i: int) -> tuple[np.ndarray, float]:
        """``(augmented audio, SNR in dB or inf)``."""
        from scipy.signal import fftconvolve

        rng = np.random.default_rng([self.seed, i])
        random.seed(int(rng.integers(2**31)))  # audiomentations draws from random and np.random
        np.random.seed(int(rng.integers(2**31)))
        if rng.random() < 0.5:
            x = resample(x, int(SAMPLE_RATE * rng.uniform(0.9, 1.1)))  # speed perturbation
        if rng.random() < self.rir_fraction:
            y = fftconvolve(x, self.rirs[int(rng.integers(len(self.rirs)))])[:len(x) + SAMPLE_RATE // 4]
            x = (y * (np.abs(x).max() / (np.abs(y).max() + 1e-9))).astype(np.float32)
        x = self.mic(samples=x.astype(np.float32), sample_rate=SAMPLE_RATE)
        pad = rng.integers(int(0.05 * SAMPLE_RATE), int(0.3 * SAMPLE_RATE), 2)
        x = np.concatenate([np.zeros(pad[0], np.float32), x, np.zeros(pad[1], np.float32)])
        snr = np.inf
        if rng.random() >= self.clean_fraction:
            x = self.noise(samples=x, sample_rate=SAMPLE_RATE)
            snr = round(20 * float(np.log10(np.sqrt(np.mean(x.astype(np.float64) ** 2)) / (self.noise.parameters["desired_noise_rms"] + 1e-12) + 1e-12)), 2)
        return np.clip(x, -1, 1).astype(np.float32), snr
