"""LoRA on MiniLM (`bert`, all-MiniLM-L6-v2) for a supervised task on real text: who speaks a turn.

The task (:func:`deepship.models.hf.data.speaker_turns`): the 8 characters of tiny-shakespeare with the
most speech turns (GLOUCESTER, DUKE VINCENTIO, ROMEO, PETRUCHIO, MENENIUS, KING RICHARD III, JULIET,
KING EDWARD IV, from different plays); each character's last 25% of turns in text order are held out.
Compared on the held-out turns, same tokenization (64 tokens):

- ``probe``: the frozen encoder's mean-pooled embeddings + logistic regression (scikit-learn), the
  reference an adapter must beat;
- ``lora``: PEFT LoRA on the attention's query and value projections plus a linear head
  (:func:`deepship.pipeline.finetune.train_classifier`), the adapter saved in PEFT's format.

Writes ``benchmarks/results/lora_minilm.json``. Run from the repository root::

    .venv/bin/python benchmarks/lora_minilm.py                 # ~3 min on 2 cores
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lora_minilm.json"))
    args = ap.parse_args()

    from transformers import AutoModel

    from deepship.models.hf import minilm_path
    from deepship.models.hf.data import speaker_turns, tokenize
    from deepship.pipeline import finetune as FT

    path = minilm_path()
    encoder = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
    tr_x, tr_y, te_x, te_y, names = speaker_turns()
    opts = FT.LoraOptions(rank=args.rank, alpha=2.0 * args.rank, targets=list(FT.ENCODER_TARGETS), steps=args.steps,
                          lr=1e-3, batch_size=32, warmup=20, seed=0)
    t0 = time.perf_counter()
    model, res = FT.train_classifier(encoder, lambda t: tokenize(path, t, max_length=args.seq), (tr_x, tr_y),
                                     (te_x, te_y), opts, progress=lambda s: print(s, flush=True))
    with tempfile.TemporaryDirectory() as d:
        folder = FT.save_adapter(model.encoder, Path(d) / "adapter", {"model": "bert", "task": "speaker-turns"})
        res["adapter_bytes"] = (folder / "adapter_model.safetensors").stat().st_size
    res.update(speakers=names, seq_len=args.seq, wall_s=round(time.perf_counter() - t0, 1),
               machine={"cores": os.cpu_count()}, load_average=[round(x, 2) for x in os.getloadavg()],
               date=time.strftime("%Y-%m-%d %H:%M"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: res[k] for k in ("lora", "probe", "chance", "adapter_bytes")}, indent=1))
    print("trainable share", res["train"]["trainable_share"], "s/step", res["train"]["s_per_step"])


if __name__ == "__main__":
    main()
