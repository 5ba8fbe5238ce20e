"""Commands that run or ship models: ``serve``, ``generate``, ``asr bundle``, ``asr transcribe``, ``deploy triton``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from ._common import app, err, out, user_errors
from ..errors import InputSpecError


@app.command("serve")
@user_errors
def serve_cmd(refs: List[str] = typer.Argument(..., help="a report.json, or .onnx files / variant folders "
                                               "(NAME=PATH to name one)"),
              host: str = typer.Option("127.0.0.1", help="interface to bind (0.0.0.0 exposes it to the network)"),
              port: int = typer.Option(8000, help="TCP port"),
              variant: List[str] = typer.Option(None, "--variant", help="report.json: serve only this variant "
                                                "(repeat), e.g. fp32-onnx"),
              model: List[str] = typer.Option(None, "--model", help="report.json: serve only this model (repeat)"),
              batching: bool = typer.Option(True, "--batching/--no-batching", help="dynamic batching"),
              max_batch_size: int = typer.Option(64, help="most samples per executed batch"),
              max_queue_delay_ms: float = typer.Option(0.0, help="most time the oldest request waits for a batch to "
                                                       "fill, ms"),
              max_queue_size: int = typer.Option(256, help="most queued requests per model; more get 503"),
              pad_bucket: int = typer.Option(0, help="encoders with an attention_mask: merge requests whose "
                                             "lengths fall in the same bucket of this many tokens, padded to the "
                                             "batch's longest (dynamic padding; 0: only equal shapes merge)"),
              timeout: float = typer.Option(10.0, help="per-request timeout, s"),
              max_body_mb: float = typer.Option(16.0, help="largest request body, MiB"),
              threads: Optional[int] = typer.Option(None, help="intra-op threads per model (default: cores - 1)"),
              kv_slots: int = typer.Option(32, help="fused-attention decoders: KV-cache slots, i.e. generations "
                                           "decoded together (continuous batching)"),
              prefill_chunk: int = typer.Option(128, help="fused-attention decoders: prompt tokens fed per decode "
                                                "step (chunked prefill)"),
              adapter: List[str] = typer.Option(None, "--adapter", help="NAME=FOLDER: a LoRA adapter (PEFT format, "
                                                "from optimize finetune) served unmerged on the fused decoder it "
                                                "was trained for; requests pick it with parameters.adapter (repeat)")):
    """Serve variants over the Open Inference Protocol (KServe v2 / Triton REST) with dynamic batching,
    and continuous batching of generation for fused-attention decoders."""
    from ..serving import BatcherConfig, ServerConfig, serve
    from ..serving.repository import ServingError

    if not 0 <= port <= 65535:
        raise ServingError(f"--port {port} is not a TCP port; give 1 to 65535 (0: any free port)")
    if (max_batch_size < 1 or max_queue_size < 1 or timeout <= 0 or max_body_mb <= 0 or max_queue_delay_ms < 0
            or kv_slots < 1 or prefill_chunk < 1 or pad_bucket < 0):
        raise ServingError("--max-batch-size, --max-queue-size, --timeout, --max-body-mb, --kv-slots and "
                           "--prefill-chunk must be positive and --max-queue-delay-ms and --pad-bucket non-negative")
    adapters = {}
    for a in adapter or []:
        name, sep, folder = a.partition("=")
        if not sep or not name or not folder:
            raise ServingError(f"--adapter {a!r} is not NAME=FOLDER; e.g. --adapter python-docs=out/gpt-lora/adapter")
        adapters[name] = folder
    cfg = ServerConfig(host=host, port=port, threads=threads, max_body_bytes=int(max_body_mb * 2 ** 20),
                       kv_slots=kv_slots, prefill_chunk=prefill_chunk, adapters=adapters,
                       batching=BatcherConfig(batching, max_batch_size, max_queue_delay_ms, max_queue_size, timeout,
                                              pad_bucket=pad_bucket))
    serve(refs, cfg, variants=variant or None, models=model or None,
          log=lambda s: err.print(s, highlight=False, soft_wrap=True))


@app.command("generate")
@user_errors
def generate_cmd(model: str = typer.Argument("gpt", help="decoder zoo name (gpt)"),
                 prompt: str = typer.Option(..., "--prompt", help="prompt text"),
                 max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="token limit"),
                 variant: str = typer.Option("fp32-onnx", help="fp32-torch | fp32-onnx | fp32-onnx-fused | int8-dynamic | "
                                             "int4-b32 | int4-b128 (aliases torch, fp32, int8, int4)"),
                 speculative: bool = typer.Option(False, "--speculative", help="speculative decoding with --draft"),
                 draft: str = typer.Option("gpt-draft", help="draft model for --speculative"),
                 k: int = typer.Option(4, "--k", help="draft tokens proposed per round"),
                 draft_variant: Optional[str] = typer.Option(None, "--draft-variant",
                                                             help="the draft's variant (default int8-dynamic)"),
                 sample: bool = typer.Option(False, "--sample", help="sample instead of greedy decoding"),
                 temperature: float = typer.Option(1.0, help="sampling temperature (with --sample)"),
                 top_k: Optional[int] = typer.Option(None, "--top-k", help="top-k filter (with --sample)"),
                 top_p: Optional[float] = typer.Option(None, "--top-p", help="nucleus top-p filter (with --sample)"),
                 seed: int = typer.Option(0, help="sampling seed"),
                 stop: List[str] = typer.Option(None, "--stop", help="one-token stop string, e.g. $'\\n'; repeatable"),
                 threads: int = typer.Option(1, help="intra-op threads (1 is fastest for batch-1 decoding of this model)"),
                 as_json: bool = typer.Option(False, "--json", help="print the result as JSON")):
    """Generate text with the GPT decoder (KV cache; optionally speculative decoding with a draft)."""
    from .. import api

    res = api.generate(model, prompt, max_new_tokens=max_new_tokens, variant=variant, speculative=speculative,
                       draft=draft, k=k, draft_variant=draft_variant, greedy=not sample, temperature=temperature, top_k=top_k, top_p=top_p,
                       seed=seed, stop=stop or (), threads=threads)
    if as_json:
        print(json.dumps(res))
        return
    out.print(prompt + res["text"], highlight=False, markup=False)
    acc = f", acceptance {res['acceptance_rate']:.2f} at k={res['k']}" if res["acceptance_rate"] is not None else ""
    err.print(f"{res['new_tokens']} tokens ({res['finish_reason']}) from {model}/{res['variant']}"
              + (f" + draft {res['draft']}" if res["draft"] else "")
              + f": prefill {res['prefill_ms']:.1f} ms, {res['tokens_per_s']:.1f} tokens/s{acc}", highlight=False)


asr_app = typer.Typer(no_args_is_help=True, help="Streaming speech recognition: deployment bundle and transcription.")
app.add_typer(asr_app, name="asr")


@asr_app.command("bundle")
@user_errors
def asr_bundle_cmd(out_dir: Path = typer.Option(Path("asr-bundle"), "--out", help="bundle folder (replaced atomically)"),
                   variant: str = typer.Option("int8-dynamic", help="fp32-onnx | int8-dynamic | int8-static"),
                   measure: bool = typer.Option(True, help="measure CER, RTF and chunk latency into the README")):
    """Write the edge deployment bundle: INT8 model, token table, feature config, a minimal runner."""
    from .. import api

    res = api.asr_bundle(out_dir, variant=variant, measure=measure)
    out.print(f"wrote {res['dir']}/ ({', '.join(res['files'])}): model {res['size_bytes'] / 1024:.0f} KB, "
              f"bundle {res['bundle_bytes'] / 1024:.0f} KB", highlight=False)
    if "cer" in res:
        out.print(f"held-out sentences: CER {res['cer'] * 100:.2f}%, WER {res['wer'] * 100:.2f}%; unseen synthesizer: CER "
                  f"{res['cer_unseen_synth'] * 100:.2f}%; isolated unseen words: CER {res['cer_words'] * 100:.2f}%; "
                  f"RTF {res['rtf_1thread']:.4f} "
                  f"on 1 thread; per-chunk p50 {res['chunk_ms_p50']:.3f} ms, p99 {res['chunk_ms_p99']:.3f} ms; "
                  f"algorithmic latency {res['algorithmic_latency_ms']:.0f} ms", highlight=False)


@asr_app.command("transcribe")
@user_errors
def asr_transcribe_cmd(audio: Path = typer.Argument(..., help="audio file (WAV/FLAC/OGG, any rate, mono or stereo), "
                                                    "or a folder of them"),
                       tsv: Path = typer.Option(Path("transcripts.tsv"), "--tsv", help="a folder: the TSV written "
                                                "(file, text, seconds, rtf, error)"),
                       stream: bool = typer.Option(False, "--stream", help="feed 100 ms pieces and print partial results"),
                       endpoint: bool = typer.Option(False, "--endpoint", help="continuous use: split at pauses (energy "
                                                     "VAD) and print each utterance as START-END<tab>TEXT (implies --stream)"),
                       variant: str = typer.Option("int8-dynamic", help="fp32-torch | fp32-onnx | int8-dynamic | int8-static"),
                       beam: int = typer.Option(0, help="CTC prefix beam search width for the final result (0: greedy)"),
                       lm: bool = typer.Option(False, "--lm", help="fuse the character 4-gram LM into the beam search "
                                               "(needs --beam)"),
                       threads: int = typer.Option(1, help="intra-op threads"),
                       as_json: bool = typer.Option(False, "--json", help="print the result as JSON")):
    """Transcribe an audio file, or every audio file of a folder (to a TSV), with the streaming recognizer."""
    from .. import api

    if audio.is_dir():
        if stream or endpoint:
            raise InputSpecError("--stream and --endpoint read one file; drop them for a folder")
        rows = api.transcribe_folder(audio, tsv, variant=variant, beam=beam, threads=threads, lm=lm,
                                     on_file=lambda r: err.print(f"{r['file']}: {r['error'] or r['text']}",
                                                                 highlight=False, markup=False))
        bad = sum(bool(r["error"]) for r in rows)
        err.print(f"wrote {tsv}: {len(rows)} files, {bad} unreadable", highlight=False)
        if as_json:
            print(json.dumps(rows))
        return

    res = api.transcribe(audio, variant=variant, stream=stream, beam=beam, threads=threads, endpoint=endpoint, lm=lm,
                         on_partial=(lambda t: err.print(f"... {t}", highlight=False, markup=False))
                         if stream or endpoint else None,
                         # plain print: rich would expand the tab that scripts split on
                         on_segment=(lambda s: print(f"{s['start_s']:.2f}-{s['end_s']:.2f}\t{s['text']}", flush=True))
                         if endpoint and not as_json else None)
    if as_json:
        print(json.dumps(res))
        return
    if not endpoint:
        out.print(res["text"], highlight=False, markup=False)
    rtf = f", RTF {res['rtf']:.4f}" if res["rtf"] is not None else ""
    err.print(f"{res['seconds']:.2f} s of audio, {res['chunks']} chunks, {res['variant']}{rtf}", highlight=False)




deploy_app = typer.Typer(no_args_is_help=True, help="Write what the serving engines people run at scale load.")
app.add_typer(deploy_app, name="deploy")


@deploy_app.command("triton")
@user_errors
def deploy_triton_cmd(report: Path = typer.Argument(..., help="report.json written by optimize report"),
                      out_dir: Path = typer.Option(Path("model_repository"), "--out",
                                                   help="Triton model repository folder (created or updated)"),
                      variant: List[str] = typer.Option(None, "--variant", help="deploy only this variant (repeat), "
                                                        "e.g. int8-static"),
                      model: List[str] = typer.Option(None, "--model", help="deploy only this model (repeat)"),
                      instances: int = typer.Option(1, help="instance_group count per model"),
                      max_batch_size: Optional[int] = typer.Option(None, help="max_batch_size (default: the largest "
                                                                   "batch the report measured)"),
                      threads: Optional[int] = typer.Option(None, help="ONNX Runtime intra-op threads per instance "
                                                            "(default: those the report measured with)"),
                      kserve_name: str = typer.Option("deepship", help="metadata.name of the KServe InferenceService"),
                      storage_uri: str = typer.Option("pvc://deepship-models/model_repository",
                                                      help="where KServe finds the repository (s3://, gs://, pvc://)"),
                      as_json: bool = typer.Option(False, "--json", help="print the summary as JSON on stdout")):
    """Write a Triton Inference Server model repository (config.pbtxt per model, numbered versions) and a
    KServe InferenceService manifest; optimize serve runs the same folder."""
    from ..serving.triton_repo import write_triton_repository

    res = write_triton_repository(report, out_dir, variants=variant or None, models=model or None,
                                  instances=instances, max_batch_size=max_batch_size, threads=threads,
                                  kserve_name=kserve_name, storage_uri=storage_uri,
                                  log=None if as_json else lambda s: err.print(s, highlight=False, soft_wrap=True))
    if as_json:
        print(json.dumps(res, indent=2))
    else:
        out.print(f"wrote {res['repository']}/ ({len(res['models'])} models) and {res['kserve']}; serve it with "
                  f"optimize serve {res['repository']}, or tritonserver --model-repository={res['repository']}",
                  highlight=False, soft_wrap=True)
