"""Token generation endpoints for served KV-cache decoders (Triton's *generate* extension).

| method | path | answer |
|---|---|---|
| POST | ``/v2/models/{name}/generate`` | ``{"model_name", "model_version", "text_output", "tokens", "finish_reason", ...}`` |
| POST | ``/v2/models/{name}/generate_stream`` | server-sent events: one ``data: {...}`` per step, then a final event |

The request body is Triton's: ``{"text_input": "...", "parameters": {...}}`` (parameters may also be
given at the top level). Parameters:

- ``max_tokens`` (default 64): new-token limit; generation also ends at the model's context;
- ``temperature`` (0 or absent: greedy), ``top_k``, ``top_p``, ``seed``: sampling;
- ``stop``: strings that end generation, each one token of the tokenizer (e.g. ``"\\n"``);
- ``adapter``: a LoRA adapter served with ``--adapter NAME=FOLDER`` on a fused-attention decoder
  (unmerged, several per graph, chosen per row: :func:`deepship.exporters.fused.add_lora`); absent:
  the base model. Requests with different adapters share decode steps;
- ``speculative`` (bool), ``draft`` (a served decoder of the same vocabulary; default the served
  ``gpt-draft`` variant of the same precision if any), ``k`` (default 4): speculative decoding
  (:func:`deepship.runtimes.generate.speculative_generate`).

A served model gets these endpoints when it is a KV-cache decoder step graph
(:func:`~deepship.serving.repository.is_kv_decoder`) of a zoo decoder whose tokenizer and context are
known (``gpt``, ``gpt-draft``, served from a ``report.json``). The loop is
:func:`deepship.runtimes.generate.generate` with :class:`~deepship.runtimes.generate.ArrayKVRunner`
over the served ONNX Runtime session (one runner per request; the session is shared, its ``run`` is
thread-safe). Each request runs in a worker thread. At most ``max_streams`` generations run at once
per model and ``max_queue_size`` more may wait; beyond that the answer is 503 with ``Retry-After``.
A streaming client that disconnects stops its generation at the next step.

Streaming text is detokenized incrementally (the whole output decoded, the new suffix sent; a suffix
ending inside a multi-byte UTF-8 character waits for the next token), so the concatenated
``text_output`` of the events equals the non-streaming ``text_output``.

Errors: bad parameters or prompt: 400 with ``{"error": "<one line>"}`` (before any event is sent);
a model that is not a decoder: 400; unknown model: 404.
"""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from ..errors import DeepshipError, InputSpecError
from ..runtimes.generate import check_max_new_tokens, check_prompt, speculative_generate
from ..runtimes.generate import generate as gen_loop
from ..runtimes.kvcache import KVLayout, make_runner
from ..runtimes.kvpool import fused_graph
from ..runtimes.sampling import Sampling
from .extensions import register_extension
from .protocol import RequestError
from .repository import ServedModel, ServingError
from .scheduler import Cancelled, DecodeScheduler, GenRequest, PoolFull

#: Generations that run at once per model (each in a worker thread).
MAX_STREAMS = 4


class _ClientGone(Exception):
    """Raised inside the generation loop when the streaming client has gone away."""


@dataclass
class Decoder:
    """What generation needs beyond the session: KV layout, tokenizer functions, zoo model name."""

    model: ServedModel
    layout: KVLayout
    encode: Any
    decode: Any
    stop_ids: Any
    zoo_name: str
    precision: str


def decoder_of(model: ServedModel) -> Decoder | None:
    """The :class:`Decoder` for a served model, or ``None`` when it is not a known zoo decoder."""
    if model.kind != "decoder":
        return None
    zoo = str(model.source.get("model", ""))
    try:
        from ..models import gpt as G  # heavy (torch, tokenizers): only when a decoder is served
        from ..models import resolve

        cfg = G.config_of(resolve(zoo))
    except (DeepshipError, KeyError, ValueError, TypeError, ImportError):
        return None
    return Decoder(model, KVLayout.of(cfg), G.encode, G.decode, G.stop_token_ids, zoo,
                   str(model.source.get("precision", "")))


def _params(body: dict) -> dict:
    p = dict(body.get("parameters") or {})
    for k, v in body.items():
        if k not in ("text_input", "parameters"):
            p.setdefault(k, v)
    return p


@dataclass
class _Job:
    """A validated generation request."""

    ids: np.ndarray
    max_tokens: int
    sampling: Sampling
    stop_ids: Any
    run: Any  # run(on_tokens) -> GenerationResult, the per-request path
    draft: str | None
    adapter: int = 0  # LoRA adapter index in the decoder's graph (0: the base model)
    adapter_name: str | None = None


class GenerateExtension:
    """The ``generate`` serving extension (see the module docstring)."""

    name = "generate"

    def applies(self, model: ServedModel) -> bool:
        return decoder_of(model) is not None

    def install(self, app: FastAPI, server: Any) -> None:
        decoders = {m.name: d for m in server.repository.models.values() if (d := decoder_of(m)) is not None}
        cfg = server.config.batching
        slots = {n: asyncio.Semaphore(MAX_STREAMS) for n in decoders}
        waiting = {n: 0 for n in decoders}
        tokens_counter = server.metrics.generated_tokens
        schedulers: dict[str, DecodeScheduler] = {}
        fused = {n: g for n, d in decoders.items() if (g := fused_graph(d.model.session)) is not None}
        attached = {n: _adapters_for(decoders[n], server.config.adapters) for n in fused}
        unused = set(server.config.adapters) - {a for names in attached.values() for a in names}
        if unused:
            raise ServingError(f"--adapter {sorted(unused)[0]}: no served fused-attention decoder of the model it was "
                               "trained for; serve that model's fp32-onnx-fused row (optimize report MODEL)")
        # decoder -> adapter name -> its index in the decoder's graph
        adapter_ids: dict[str, dict[str, int]] = {n: {a: i for i, a in enumerate(attached.get(n, {}), start=1)}
                                                  for n in decoders}
        for n, graph in fused.items():
            d = decoders[n]
            if attached[n]:
                graph = _lora_session(graph, d, attached[n])
            n_slots = server.config.kv_slots
            observe = server.metrics.generation_observer(n, n_slots, d.layout.cache_bytes(n_slots, d.layout.context))
            sch = DecodeScheduler(graph, d.layout, slots=n_slots, max_queue=cfg.max_queue_size,
                                  chunk=server.config.prefill_chunk, observe=observe, name=n)
            schedulers[n] = sch
            server.on_stop.append(sch.close)

        def lookup(name: str, version: str | None) -> Decoder:
            m = server.model(name, version)
            d = decoders.get(m.name)
            if d is None:
                raise RequestError(f"model '{m.name}' is not a KV-cache decoder with a known tokenizer; "
                                   "use /infer for it", 400)
            return d

        def prepare(d: Decoder, body: bytes) -> _Job:
            """Validate the request (every check the loop makes first, before any event is sent)."""
            try:
                req = orjson.loads(body or b"{}")
                assert isinstance(req, dict)
            except (orjson.JSONDecodeError, AssertionError):
                raise RequestError("the body is not a JSON object; send {\"text_input\": \"...\", \"parameters\": {...}}",
                                   400) from None
            text = req.get("text_input")
            if not isinstance(text, str) or not text:
                raise RequestError("text_input is missing or empty; send the prompt as a non-empty string", 400)
            p = _params(req)
            try:
                max_tokens = int(p.get("max_tokens", 64))
                temperature = float(p.get("temperature", 0) or 0)
                top_k = None if p.get("top_k") in (None, 0) else int(p["top_k"])
                top_p = None if p.get("top_p") in (None, 1, 1.0) else float(p["top_p"])
                seed = int(p.get("seed", 0))
                k = int(p.get("k", 4))
            except (TypeError, ValueError) as e:
                raise RequestError(f"a generation parameter has the wrong type ({e}); max_tokens, top_k, seed and k "
                                   "are integers, temperature and top_p numbers", 400) from None
            stops = p.get("stop") or []
            if isinstance(stops, str):
                stops = [stops]
            try:
                ids = d.encode(text)[None]
                stop_ids = d.stop_ids(stops)
                sampling = Sampling(greedy=temperature <= 0, temperature=temperature if temperature > 0 else 1.0,
                                    top_k=top_k, top_p=top_p, seed=seed)
                check_prompt(ids, d.layout)
                check_max_new_tokens(max_tokens, "max_tokens")
                sampling.check(d.layout.vocab_size)
                adapter = _adapter_index(d, p.get("adapter"), adapter_ids[d.model.name], bool(p.get("speculative")))
                draft = None
                if p.get("speculative"):
                    draft = draft_for(d, p.get("draft"))
                    if k <= 0:
                        raise InputSpecError(f"k {k} must be a positive integer (draft tokens proposed per round)")
                run = None  # continuous batching: decoded in the decoder's batch
                if draft is not None or d.model.name not in schedulers:  # its own runner in a worker thread
                    run = _solo_run(make_runner(d.model.session, d.layout),
                                    make_runner(draft.model.session, draft.layout) if draft is not None else None,
                                    ids, max_tokens, k, sampling, stop_ids)
            except DeepshipError as e:
                raise RequestError(str(e), 400) from None
            return _Job(ids[0], max_tokens, sampling, stop_ids, run, draft.model.name if draft is not None else None,
                        adapter, str(p["adapter"]) if adapter else None)

        def draft_for(d: Decoder, name: str | None) -> Decoder:
            if name:
                m = server.repository.get(str(name))
                dd = decoders.get(m.name) if m is not None else None
                if dd is None:
                    raise InputSpecError(f"draft '{str(name)[:64]}' is not a served decoder; serve it too "
                                         f"(served decoders: {', '.join(decoders) or 'none'})")
            else:
                cands = [x for x in decoders.values() if x.zoo_name != d.zoo_name and x.layout.vocab_size == d.layout.vocab_size]
                cands.sort(key=lambda x: (x.precision != d.precision, x.layout.n_layer))
                if not cands:
                    raise InputSpecError("speculative decoding needs a draft decoder served beside the target "
                                         "(e.g. optimize report gpt gpt-draft, then serve that report)")
                dd = cands[0]
            if dd.layout.vocab_size != d.layout.vocab_size:
                raise InputSpecError(f"draft '{dd.model.name}' has another vocabulary than '{d.model.name}'")
            return dd

        async def admit(name: str) -> None:
            sem = slots[name]
            if sem.locked() and waiting[name] >= cfg.max_queue_size:
                raise RequestError(f"model '{name}' has {MAX_STREAMS} generations running and "
                                   f"{waiting[name]} waiting; retry later", 503, cfg.retry_after_s)
            waiting[name] += 1
            try:
                await asyncio.wait_for(sem.acquire(), timeout=cfg.timeout_s)
            except asyncio.TimeoutError:
                raise RequestError(f"model '{name}' stayed busy for {cfg.timeout_s:g} s; retry later", 503,
                                   cfg.retry_after_s) from None
            finally:
                waiting[name] -= 1

        def result_body(d: Decoder, res, job: _Job) -> dict:
            toks = [int(t) for t in res.row(0)]
            out = {"model_name": d.model.name, "model_version": "1", "text_output": d.decode(toks) if toks else "",
                   "tokens": toks, "finish_reason": res.finish_reasons[0], "prompt_tokens": len(job.ids),
                   "completion_tokens": len(toks), "prefill_ms": round(res.prefill_ms, 3),
                   "decode_ms": round(res.decode_ms, 3), "tokens_per_s": round(res.tokens_per_s, 1)}
            if job.draft is not None:
                out.update(draft=job.draft, acceptance_rate=res.acceptance_rate, k=res.k)
            if job.adapter_name is not None:
                out["adapter"] = job.adapter_name
            return out

        def counted(d: Decoder, fut: asyncio.Future, t0: float, release) -> asyncio.Future:
            """Count the request (and release its stream slot) when ``fut`` ends, even if the client has
            gone and nobody awaits it."""
            def finished(f: asyncio.Future) -> None:
                release()
                ok = not f.cancelled() and f.exception() is None
                if ok:
                    tokens_counter.labels(d.model.name).inc(f.result().new_tokens)
                gone = not f.cancelled() and isinstance(f.exception(), (_ClientGone, Cancelled))
                server.metrics.request(d.model.name, 200 if ok else 499 if gone else 500, time.perf_counter() - t0)

            fut.add_done_callback(finished)
            return fut

        def refuse(name: str, e: RequestError, t0: float) -> None:
            server.metrics.request(name if server.repository.get(name) else "unknown", e.status,
                                   time.perf_counter() - t0)

        async def launch(name: str, request: Request, version: str | None, t0: float, on_tokens):
            """Look up, validate, admit and start a request: ``(decoder, future, job, cancel)``; the future resolves to its :class:`~deepship.runtimes.generate.GenerationResult`."""
            try:
                d = lookup(name, version)
                job = prepare(d, await request.body())
                if job.run is None:  # continuous batching: a slot of the decoder's pool, or 503
                    greq = GenRequest(job.ids, job.max_tokens, job.sampling, frozenset(job.stop_ids), on_tokens,
                                      adapter=job.adapter)
                    try:
                        cf = schedulers[d.model.name].submit(greq)
                    except PoolFull as e:
                        raise RequestError(str(e), 503, cfg.retry_after_s) from None
                    fut = counted(d, asyncio.wrap_future(cf), t0, lambda: None)
                    return d, fut, job, greq.cancel
                await admit(d.model.name)
            except RequestError as e:
                refuse(name, e, t0)
                raise
            fut = asyncio.get_running_loop().run_in_executor(None, job.run, on_tokens)
            return d, counted(d, fut, t0, slots[d.model.name].release), job, lambda: None

        async def generate(name: str, request: Request, version: str | None = None):
            t0 = time.perf_counter()
            d, fut, job, _ = await launch(name, request, version, t0, None)
            res = await asyncio.shield(fut)
            return Response(orjson.dumps(result_body(d, res, job)), 200, media_type="application/json")

        async def generate_stream(name: str, request: Request, version: str | None = None):
            t0 = time.perf_counter()
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue = asyncio.Queue()
            gone = threading.Event()

            def on_tokens(new: np.ndarray) -> None:
                if gone.is_set():
                    raise _ClientGone()
                loop.call_soon_threadsafe(queue.put_nowait, [int(t) for t in new[0] if t >= 0])

            d, fut, job, cancel = await launch(name, request, version, t0, on_tokens)
            fut.add_done_callback(lambda f: queue.put_nowait(f))
            return StreamingResponse(_events(d, queue, gone, cancel, job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})

        async def _events(d: Decoder, queue: asyncio.Queue, gone: threading.Event, cancel, job: _Job):
            label = d.model.name
            toks: list[int] = []
            sent = ""
            try:
                while True:
                    items = [await queue.get()]
                    while not queue.empty():  # a client that fell behind gets the tokens so far in one event
                        items.append(queue.get_nowait())
                    end = next((x for x in items if isinstance(x, asyncio.Future)), None)
                    new = [t for x in items if not isinstance(x, asyncio.Future) for t in x]
                    toks.extend(new)
                    text = d.decode(toks) if toks else ""
                    if new and end is None and not text.endswith("\ufffd"):  # not inside a multi-byte character
                        delta, sent = text[len(sent):], text
                        yield _sse({"model_name": label, "model_version": "1", "text_output": delta, "tokens": new})
                    elif new and end is None:
                        continue
                    if end is not None:  # the generation has ended
                        if end.cancelled() or end.exception() is not None:
                            e = end.exception() if not end.cancelled() else RuntimeError("cancelled")
                            yield _sse({"model_name": label, "error": f"{type(e).__name__}: {str(e)[:160]}"})
                            return
                        final = result_body(d, end.result(), job)
                        final["text_output"] = text[len(sent):]
                        final["final"] = True
                        yield _sse(final)
                        return
            finally:
                gone.set()  # a client that went away stops the generation at its next step
                cancel()

        for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            app.post(prefix + "/generate")(generate)
            app.post(prefix + "/generate_stream")(generate_stream)


def _adapters_for(d: Decoder, adapters: dict[str, str]) -> dict[str, str]:
    """The configured adapters (``{name: folder}``) trained on ``d``'s zoo model, as their
    ``deepship.json`` says (an adapter without one is tried on every fused decoder)."""
    import json
    from pathlib import Path

    mine = {}
    for name, folder in adapters.items():
        meta_path = Path(folder) / "deepship.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        if meta.get("model", d.zoo_name) == d.zoo_name:
            mine[name] = folder
    return mine


def _lora_session(graph: Any, d: Decoder, mine: dict[str, str]) -> Any:
    """A session of the fused graph with the branches of adapters ``mine`` (index ``i`` for the ``i``-th,
    from 1; :func:`deepship.exporters.fused.add_lora`).

    Raises:
        ServingError: an adapter folder that cannot be read or does not fit the decoder.
    """
    import onnx

    from ..exporters.fused import add_lora, read_peft_adapter
    from ..runtimes.session import OrtSession

    try:
        model = add_lora(onnx.load(graph.path), [read_peft_adapter(f) for f in mine.values()])
    except DeepshipError as e:
        raise ServingError(f"--adapter for {d.model.name}: {e}") from None
    return OrtSession(graph.path, threads=graph.threads, model=model)


def _adapter_index(d: Decoder, name: Any, known: dict[str, int], speculative: bool) -> int:
    """The graph index of a request's ``adapter`` (0 without one).

    Raises:
        InputSpecError: an adapter this decoder does not serve, or with speculative decoding.
    """
    if name in (None, ""):
        return 0
    if str(name) not in known:
        served = ", ".join(known) or "none (start the server with --adapter NAME=FOLDER)"
        raise InputSpecError(f"adapter '{str(name)[:64]}' is not served on {d.model.name}; adapters: {served}")
    if speculative:
        raise InputSpecError("a LoRA adapter and speculative decoding do not combine (the draft has no adapter); "
                             "drop one of them")
    return known[str(name)]


def _solo_run(runner, draft_runner, ids, max_tokens: int, k: int, sampling: Sampling, stop_ids):
    """``run(on_tokens) -> GenerationResult`` for one request on its own runner (and draft)."""
    def run(on_tokens):
        if draft_runner is not None:
            return speculative_generate(runner, draft_runner, ids, max_tokens, k=k, sampling=sampling,
                                        stop_tokens=stop_ids, on_tokens=on_tokens)
        return gen_loop(runner, ids, max_tokens, sampling=sampling, stop_tokens=stop_ids, on_tokens=on_tokens)

    return run


def _sse(obj: dict) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


register_extension(GenerateExtension())
