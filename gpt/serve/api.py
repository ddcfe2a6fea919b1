"""The HTTP API over the engine (FastAPI): OpenAI's completions shape, server-sent events, a page to try it.

    POST /v1/completions   prompt (a string or a list), max_tokens, temperature, top_p, top_k and min_p
                           (extensions), n, stop, seed, stream, logprobs, echo; usage in every answer
                           (streamed: last, if stream_options asks for it, as OpenAI's)
    GET  /v1/models        the model: its checkpoint step and config
    POST /v1/reload        load the newest checkpoint of out_dir now (also done every reload_interval seconds)
    GET  /health           ok, with the step and the decode batch's occupancy
    GET  /                 a page: a prompt box, the knobs, the completion streamed as it is written

Every bad request is an HTTP 4xx with OpenAI's error object naming the field: malformed JSON, an unknown field,
a value out of range, a prompt that leaves no room for max_tokens in the context (400), too many requests at
once (429). A client that disconnects mid-stream frees its slot at the next chunk.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from gpt.exits import one_line
from gpt.sampling import stop_rule
from gpt.serve.engine import TOP_LOGPROBS, Request
from gpt.serve.served import Served


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """OpenAI's completion request, less what this server cannot honour (an unknown field is refused, not
    ignored), plus top_k and min_p."""
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]  # text, or token ids (lm-eval's local-completions)
    max_tokens: int = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, lt=2**31)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**31)
    stream: bool = False
    logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)
    echo: bool = False
    user: str | None = None
    stream_options: StreamOptions | None = None
    # What OpenAI clients send by default, accepted at the values that change nothing.
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0)
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0)
    best_of: int | None = Field(None, ge=1, le=1)
    logit_bias: dict[str, float] | None = Field(None, max_length=0)
    suffix: str | None = Field(None, max_length=0)


def error(status: int, message: str, param: str | None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param,
                                                               "code": None}})


@dataclass(frozen=True)
class Update:
    """A request as the engine thread emitted it (it goes on changing the request while the handler reads)."""
    request: Request
    tokens: list[int]
    steps: int  # how many of request.steps there were
    finish: str | None

    @staticmethod
    def of(request: Request) -> "Update":
        return Update(request, list(request.tokens), len(request.steps), request.finish)


class Choice:
    """One choice of a completion: the request the engine decodes, and what of its text has been sent."""

    def __init__(self, index: int, prompt: str, prompt_ids: list[int], request: Request | None):
        self.index, self.prompt, self.prompt_ids, self.request = index, prompt, prompt_ids, request
        self.sent = 0  # characters of the completion already streamed
        self.sent_tokens = 0  # its tokens whose log-probabilities have been streamed
        self.offset = 0  # where the next streamed token's text starts (logprobs' text_offset)


def create_app(served: Served) -> FastAPI:
    app = FastAPI(title="gpt-jax", docs_url=None, redoc_url=None)
    page = resources.files("gpt.serve").joinpath("page.html").read_text(encoding="utf-8")

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        first = exc.errors()[0]
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return error(400, f"the body is not valid JSON ({first.get('msg')})", None)
        field = where[0] if where else None
        message = {"extra_forbidden": f"unknown field {field!r}"}.get(first.get("type"), first.get("msg"))
        return error(400, f"{field}: {message}" if field else message, field)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    @app.get("/health")
    async def health():
        return {"status": "ok", "step": served.step, **served.engine.counts()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [served.card()]}

    @app.post("/v1/reload")
    async def reload():
        try:
            step, reloaded = await asyncio.to_thread(served.reload)
        except Exception as e:  # a checkpoint rotated away mid-read, a full disk: say so, serve on
            return error(503, f"reload failed: {one_line(e)}", None, "server_error")
        return {"step": step, "reloaded": reloaded}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        tok, block = served.tokenizer, served.cfg.block_size
        if isinstance(body.prompt, str) or (body.prompt and isinstance(body.prompt[0], int)):
            prompts = [body.prompt]
        else:
            prompts = body.prompt
        if not prompts or any(len(p) == 0 for p in prompts):
            return error(400, "prompt: give a non-empty string (or token ids), or a list of them", "prompt")
        encoded = [tok.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        if any(not 0 <= i < served.cfg.vocab_size for ids in encoded for i in ids):
            return error(400, f"prompt: token ids must be in [0, {served.cfg.vocab_size})", "prompt")
        prompts = [p if isinstance(p, str) else tok.decode(p) for p in prompts]
        if len(prompts) * body.n > served.engine.max_queue:
            return error(400, f"n: {len(prompts)} prompts x n={body.n} choices exceed the server's queue of "
                              f"{served.engine.max_queue}", "n")
        stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            return error(400, "stop: at most 4 non-empty strings", "stop")
        for ids in encoded:
            if len(ids) + body.max_tokens > block:
                return error(400, f"prompt: {len(ids)} tokens + max_tokens {body.max_tokens} exceed the model's context "
                                  f"of {block} tokens", "prompt")
        seed = body.seed if body.seed is not None else int.from_bytes(os.urandom(4), "little") % 2**31
        loop, updates = asyncio.get_running_loop(), asyncio.Queue()
        stop = stop_rule(stops, tok.decode)
        choices = []
        for p, (prompt, ids) in enumerate(zip(prompts, encoded)):
            for j in range(body.n):
                request = None
                if body.max_tokens > 0:
                    request = Request(ids, body.max_tokens, body.temperature, body.top_k, body.top_p, body.min_p,
                                      seed + j, body.logprobs if body.logprobs is not None else -1,
                                      emit=lambda r: loop.call_soon_threadsafe(updates.put_nowait, Update.of(r)),
                                      stop=stop)
                choices.append(Choice(p * body.n + j, prompt, ids, request))
        try:
            served.engine.submit([c.request for c in choices if c.request is not None])
        except queue.Full:
            return error(429, "too many requests at once: the decode batch and its queue are full; retry later",
                         None, "rate_limit_exceeded")
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": served.name}
        running = {id(c.request): c for c in choices if c.request is not None}

        def finished_choice(c: Choice, logprobs) -> dict:
            text = served.visible(c.request.tokens if c.request else [], stops)
            return {"text": (c.prompt if body.echo else "") + text, "index": c.index, "logprobs": logprobs,
                    "finish_reason": (c.request.finish if c.request else "length")}

        def usage() -> dict:
            completion = sum(len(c.request.tokens) for c in choices if c.request)
            prompt = sum(map(len, encoded))  # each prompt once, however many choices it has (as OpenAI counts)
            return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

        def cancel_all():
            for c in choices:
                if c.request is not None and c.request.finish is None:
                    c.request.cancelled.set()

        if not body.stream:
            while running:  # plain handlers are not cancelled when the client goes: look every half second
                try:
                    update = await asyncio.wait_for(updates.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        cancel_all()
                        return error(499, "the client closed the connection", None)
                    continue
                if update.finish is not None:  # the engine leaves a finished request alone: read it whole below
                    running.pop(id(update.request), None)
            if any(c.request is not None and c.request.finish == "error" for c in choices):
                return error(500, "decoding failed on the server (its log says why); the server goes on", None,
                             "server_error")
            logprobs = [await asyncio.to_thread(served.logprobs, c, body) if body.logprobs is not None else None
                        for c in choices]  # a forward pass for echo: off the event loop
            return {**head, "choices": [finished_choice(c, lp) for c, lp in zip(choices, logprobs)],
                    "usage": usage()}

        async def events():
            try:
                for c in choices:
                    c.offset = 0 if body.echo else len(c.prompt)
                    if body.echo:
                        echoed = None
                        if body.logprobs is not None:  # a forward pass: off the event loop
                            entries = await asyncio.to_thread(served.score, c.prompt_ids, body.logprobs)
                            echoed = served.logprobs_object(entries, 0)
                            c.offset = sum(map(len, echoed["tokens"]))
                        yield _sse({**head, "choices": [{"text": c.prompt, "index": c.index, "logprobs": echoed,
                                                         "finish_reason": None}]})
                for c in choices:
                    if c.request is None:
                        empty = served.logprobs_object([], c.offset) if body.logprobs is not None else None
                        yield _sse({**head, "choices": [finished_choice(c, empty) | {"text": ""}]})
                while running:
                    update = await updates.get()  # what the request held when the engine emitted it
                    c = running.get(id(update.request))
                    if c is None:
                        continue
                    text = served.visible(update.tokens, stops, hold=update.finish is None)
                    delta, c.sent = text[c.sent:], max(c.sent, len(text))
                    logprobs = None
                    if body.logprobs is not None:  # those of the tokens the text shown so far holds whole
                        end = update.steps if update.finish is not None else \
                            min(served.whole_tokens(update.tokens, c.sent_tokens, c.sent), update.steps)
                        logprobs = served.logprobs_object(
                            served.steps(update.request, c.sent_tokens, end, body.logprobs), c.offset)
                        c.sent_tokens, c.offset = end, c.offset + sum(map(len, logprobs["tokens"]))
                    if update.finish is not None:
                        running.pop(id(update.request))
                    if delta or update.finish is not None or (logprobs and logprobs["tokens"]):
                        yield _sse({**head, "choices": [{"text": delta, "index": c.index, "logprobs": logprobs,
                                                         "finish_reason": update.finish}]})
                    if await http.is_disconnected():
                        return  # (the finally below frees the slots)
                if body.stream_options is not None and body.stream_options.include_usage:
                    yield _sse({**head, "choices": [], "usage": usage()})
                yield "data: [DONE]\n\n"
            finally:  # the client disconnected (or the stream ended): free the slots
                cancel_all()

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"
