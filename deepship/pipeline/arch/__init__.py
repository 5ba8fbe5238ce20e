"""The architecture families' adapters, one module each (registered in :mod:`deepship.pipeline.adapters`).

| module | families | what it adds |
|---|---|---|
| :mod:`.zoo_small` | ``vision``, ``rnn`` | prune and distill chains in the report, pruning support for MLP, LeNet, LSTM/GRU |
| :mod:`.gpt` | ``gpt`` | the ``onnx-kv`` export stage, head pruning, tokens/s and speculative-decoding measures, runners |
| :mod:`.asr` | ``asr`` | streaming CER, RTF and chunk latency; the recognizer's variants |
| :mod:`.hf` | ``hf`` | Optimum export, the encoder plan, cosine and recall@1 against FP32 |
| :mod:`.mamba` | ``mamba`` | the step graph and its parity, streaming tokens/s |
| :mod:`.generative` | ``generative`` | Frechet distance and accuracy of generated samples |
"""
