"""ASR family: a streaming speech recognizer for the edge, Conformer encoder + LSTM + CTC over characters.

Architecture (:class:`StreamingConformerCTC`), input 80-dim log-mel fbank at 100 frames/s:

1. global CMVN (training-set mean and std, buffers of the module);
2. convolutional subsampling x4 (two ``Conv2d(k=3, stride=2)``, no padding in time; the 3 frames it
   needs from the previous chunk are the ``sub_cache`` state) -> 25 frames/s, 40 ms per frame;
3. ``n_layers`` Conformer blocks (Gulati et al. 2020, "Conformer: Convolution-augmented Transformer
   for Speech Recognition"): half-step feed-forward, multi-head self-attention over the chunk and
   ``left_context`` cached frames (keys and values cached: ``att_cache``), a convolution module with a
   *causal* depthwise convolution (its last ``kernel - 1`` inputs cached: ``conv_cache``), a second
   half-step feed-forward, LayerNorm. No relative position encoding: the depthwise convolution
   carries order, which keeps the attention cache a plain K/V window;
4. one unidirectional LSTM layer (state ``lstm_h``, ``lstm_c``): after self-attention for sequential
   inertia and cheap, quantization-friendly recurrence, as the seed notes recommend for hearing aids;
5. a linear CTC head over :data:`~deepship.models.asr.data.VOCAB` (blank = 0; Graves et al. 2006).

One code path (:meth:`StreamingConformerCTC.forward`) runs a chunk with its states; the
whole-utterance forward used in training (:meth:`~StreamingConformerCTC.forward_full`) is the same
computation with zero initial states and a chunk attention mask, so a streamed utterance equals the
whole-utterance output up to float rounding (tested). Nothing looks past the current chunk: the
algorithmic latency is the chunk (40 ms by default) plus the fbank window overhang (15 ms).

The exported graph is the chunk step, every state an explicit input and output, batch-first, so a
server can stack streams into a batch:

| input | shape (float32) | output |
|---|---|---|
| ``x`` | ``(batch, 4 * chunk, 80)`` raw fbank frames | ``log_probs`` ``(batch, chunk, vocab)`` |
| ``sub_cache`` | ``(batch, 3, 80)`` | ``next_sub_cache`` |
| ``att_cache`` | ``(batch, n_layers, left_context, 2 * d_model)`` | ``next_att_cache`` |
| ``conv_cache`` | ``(batch, n_layers, d_model, kernel - 1)`` | ``next_conv_cache`` |
| ``lstm_h``, ``lstm_c`` | ``(batch, lstm_hidden)`` | ``next_lstm_h``, ``next_lstm_c`` |

Files: ``model.py`` (the module, its config, chunk streaming), ``data.py`` (the corpus, fbank features,
audio files), ``text.py`` (open-vocabulary text), ``voices.py`` (synthesizers, augmentation), ``train.py``
(the CTC recipe). The streaming evaluation (CER, RTF, chunk latency) is the pipeline's:
:mod:`deepship.pipeline.arch.asr`.
"""
from __future__ import annotations

import functools

import numpy as np

from ..spec import Dataset, Metric, ModelSpec, Split
from ..train import train_log, trained_model
from . import data as S
from .data import SpeechCorpus, SpeechSet  # noqa: F401
from .model import (DEFAULT, OUTPUT_NAMES, STATE_NAMES, SUBSAMPLING, ASRConfig, StreamingConformerCTC,  # noqa: F401
                    initial_state, input_specs, pad_frames, pad_to, padded_length, stream_batch, torch_run)
from .train import RECIPE, train_asr


def _build(arch: dict | None = None) -> StreamingConformerCTC:
    return StreamingConformerCTC(ASRConfig.from_dict({**DEFAULT.to_dict(), **(arch or {})}))


#: character error rate (fraction, shown in %); the family's adapter computes it
#: (:func:`deepship.pipeline.arch.asr.evaluate_cer`) by streaming whole utterances: one batch of chunk
#: outputs does not give it
CER = Metric("cer", False, None, unit="%", scale=100.0)


def asr_spec() -> ModelSpec:
    """The ``asr`` zoo entry: streaming Conformer + LSTM + CTC on synthesized speech (see the module docstring)."""
    cfg = DEFAULT
    return ModelSpec(
        name="asr", task="speech-recognition", build=_build, inputs=input_specs(cfg), output_names=OUTPUT_NAMES,
        metric=CER, data=lambda: chunk_dataset(cfg), recipe=dict(RECIPE), train=_train_spec,
        train_data=corpus, family="asr",
        description=f"streaming Conformer ({cfg.n_layers} blocks, d {cfg.d_model}) + LSTM + CTC, "
                    f"{cfg.chunk_ms:.0f} ms chunks, open-vocabulary English from three synthesizers",
        extra={"config": cfg.to_dict()},
    )


def _train_spec(model, ds, recipe):
    return train_asr(model, ds, {**recipe, "_log": train_log("asr")})


@functools.lru_cache(maxsize=1)
def trained() -> StreamingConformerCTC:
    """The trained ``asr`` module (committed weights, cache, or a training run), eval mode."""
    return trained_model(asr_spec())[0]


def feature_mean() -> np.ndarray:
    """float32 ``(80,)``: the training-set fbank mean stored in the trained model (pads chunks)."""
    return trained().mean.numpy().astype(np.float32)


def feature_config(cfg: ASRConfig = DEFAULT) -> dict:
    """The ``features.json`` of the streaming runner (:class:`deepship.runtimes.asr_stream.FeatureConfig`)."""
    st = initial_state(cfg, 1)
    return {"sample_rate": S.SAMPLE_RATE, "n_mels": cfg.n_mels, "frame_length_ms": S.FRAME_LENGTH_MS,
            "frame_shift_ms": S.FRAME_SHIFT_MS, "chunk_frames": cfg.chunk_frames,
            "chunk_ms": cfg.chunk_ms, "algorithmic_latency_ms": cfg.algorithmic_latency_ms,
            "mean": [round(float(v), 6) for v in feature_mean()],
            "state_shapes": {k: list(v.shape[1:]) for k, v in st.items()}, "tokens": S.VOCAB,
            "blank": 0, "library": "kaldi-native-fbank OnlineFbank, snip_edges false, dither 0"}


@functools.lru_cache(maxsize=1)
def corpus() -> "S.SpeechCorpus":
    """The recipe's speech corpus, read from its cache once per process (the report's evaluation,
    measurements and calibration all use it)."""
    return S.corpus(RECIPE["corpus"])


def _record(part: "S.SpeechSet", n_utts: int, n: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.permutation(len(part))[:n_utts])
    rec: list = []
    stream_batch(torch_run(trained()), [part.feats[i] for i in idx], DEFAULT, feature_mean(), record=rec)
    pick = np.sort(rng.permutation(len(rec))[:n])
    return Split({k: np.concatenate([rec[i][2][k] for i in pick]) for k in rec[0][2]}, None)


def chunk_dataset(cfg: ASRConfig = DEFAULT) -> Dataset:
    """Real streaming chunks with their states, recorded by streaming utterances through the trained
    FP32 model: 256 from the corpus's calibration utterances (training voices, texts and augmentation;
    INT8 calibration) and 128 from held-out sentences (the report's drift and per-chunk latency inputs).
    The metric itself streams whole utterances (:func:`deepship.pipeline.arch.asr.evaluate_cer`)."""
    c = corpus()
    return Dataset(_record(c.calib, len(c.calib), 256, 0), _record(c.test, 32, 128, 1),
                   source=f"synthesized speech (espeak-ng, Festival; Flite unseen): {len(c.test)} held-out sentences "
                          f"with unseen words, {len(c.sets['unseen_synth'])} by an unseen synthesizer, "
                          f"{len(c.sets['words'])} isolated unseen words")


#: the zoo entries of this family (read by :mod:`deepship.models.zoo`)
SPECS = {"asr": asr_spec}
