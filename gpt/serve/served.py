"""What the server serves: the parameters (from a checkpoint, picked up again when a newer one is saved, or from
a Hugging Face directory), the tokenizer, the decode engine, and the text and log-probabilities of a choice."""

from __future__ import annotations

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from gpt import checkpoint
from gpt.config import MeshConfig, ServeConfig
from gpt.exits import one_line
from gpt.model import GPT
from gpt.sampling import before_stop, bucket, load_model
from gpt.serve.engine import Engine
from gpt.tokenizer import get_tokenizer


class Served:
    def __init__(self, s: ServeConfig, mesh: MeshConfig, log=print):
        self.s, self.mesh, self.log = s, mesh, log
        self.cfg, params, tokenizer, self.source, self.step = load_model(s.init_from, s.out_dir, s.step, mesh)
        self.tokenizer = get_tokenizer(tokenizer)
        self.name = s.model_name or ("gpt-jax" if s.init_from == "resume" else "gpt2")
        self.engine = Engine(self.cfg, params, self.tokenizer.eot_token, s.max_batch, s.max_queue, log)
        self._score = jax.jit(lambda p, ids: GPT(self.cfg).apply({"params": p}, ids)[0])
        self._scored: set[int] = set()  # the lengths _score has been compiled for
        self._reload_lock = threading.Lock()
        self.rejected: set[int] = set()  # checkpoint steps of another model: not loaded again
        self.pending_step: int | None = None  # loaded, waiting for the requests in flight to finish
        self.loaded_at = int(time.time())
        self._closed = threading.Event()

    def close(self) -> None:
        """Stop watching for checkpoints and decoding."""
        self._closed.set()
        self.engine.close()

    def card(self) -> dict:
        """GET /v1/models' entry: the checkpoint's step and the model's config."""
        return {"id": self.name, "object": "model", "created": self.loaded_at, "owned_by": "gpt-jax",
                "source": self.source, "step": self.step, "config": self.cfg.__dict__}

    def reload(self) -> tuple[int | None, bool]:
        """Load the newest complete checkpoint of out_dir if it is newer than the one served: (step, whether
        it was). Orbax lists only checkpoints whose writing finished, so a half-written one is never read; the
        engine takes the new parameters once the requests decoding now are done."""
        if self.s.init_from != "resume":
            return self.step, False
        with self._reload_lock:
            manager = checkpoint.make_manager(self.s.out_dir, read_only=True)
            steps = manager.all_steps()
            manager.close()
            newest = max(steps, default=None)
            if newest is None or newest in self.rejected or newest == self.pending_step or \
                    (self.step is not None and newest <= self.step):
                return self.step, False
            cfg, params, _, step = checkpoint.load_params(self.s.out_dir, newest, self.mesh)
            if cfg != self.cfg:
                self.rejected.add(newest)
                self.log(f"warning: step {step} of {self.s.out_dir} is another model; still serving step {self.step}")
                return self.step, False
            def swapped():  # what /v1/models reports changes when the engine takes the new parameters
                self.step, self.source, self.pending_step = step, f"{self.s.out_dir} step {step}", None
                self.log(f"serving {self.source}")

            self.pending_step = step
            self.engine.swap_params(params, swapped)
            return step, True

    def watch(self) -> None:
        """Reload every reload_interval seconds (in a daemon thread), if that is set."""
        def loop():
            while not self._closed.wait(self.s.reload_interval):
                try:
                    self.reload()
                except Exception as e:  # a checkpoint rotated away mid-read, a full disk: try again later
                    self.log(f"warning: reload failed ({one_line(e)})")

        if self.s.reload_interval > 0 and self.s.init_from == "resume":
            threading.Thread(target=loop, daemon=True, name="checkpoint-watch").start()

    def visible(self, ids: list[int], stops: list[str], hold: bool = False) -> str:
        """The text of ids (less a final end-of-text) up to a stop string; with hold (the choice still runs),
        less what might still turn into a stop string or a character whose bytes are not all out yet."""
        eot = self.tokenizer.eot_token
        text = self.tokenizer.decode(ids[:-1] if ids and eot is not None and ids[-1] == eot else ids)
        text = before_stop(text, stops)
        if hold:
            text = text.rstrip("\ufffd")
            cut = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[: len(text) - cut]
        return text

    def logprobs(self, choice, body) -> dict:
        """OpenAI's logprobs object of a finished choice: each token (of the prompt too, with echo: its first
        token has none), its log-probability, and the top `logprobs` alternatives."""
        entries = self.score(choice.prompt_ids, body.logprobs) if body.echo else []
        if choice.request is not None:
            entries += self.steps(choice.request, 0, len(choice.request.steps), body.logprobs)
        return self.logprobs_object(entries, 0 if body.echo else len(choice.prompt))

    @staticmethod
    def steps(request, start: int, end: int, k: int) -> list:
        """(token id, log-prob, [(id, log-prob)] of the top k) of the request's new tokens start .. end - 1."""
        return [(t, lp, top[:k]) for t, lp, top in request.steps[start:end]]

    def logprobs_object(self, entries: list, offset: int) -> dict:
        """The logprobs object of entries (token id, log-prob or None, alternatives), the first of which starts
        at character `offset` of the text."""
        decode = self.tokenizer.decode
        tokens, offsets = [], []
        for token, _, _ in entries:
            tokens.append(decode([token]))
            offsets.append(offset)
            offset += len(tokens[-1])
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [None if lp is None else {decode([i]): v for i, v in top} for _, lp, top in entries],
                "text_offset": offsets}

    def whole_tokens(self, ids: list[int], start: int, chars: int) -> int:
        """The most of ids (at least start) whose text fits in its first `chars` characters: the tokens a stream
        has shown so far (a token that ends inside a character decodes to a replacement character, which the
        stream holds back, so it is not counted before the token that completes the character)."""
        covered = start
        for n in range(start + 1, len(ids) + 1):
            if len(self.tokenizer.decode(ids[:n])) > chars:
                break
            covered = n
        return covered

    def score(self, ids: list[int], k: int) -> list:
        """(token, log-prob given the tokens before it, top k alternatives) of every token of ids; the first has
        no log-prob. One forward pass, padded at the end to a bucket length (causality hides the padding)."""
        length = min(bucket(len(ids)), self.cfg.block_size)
        if length not in self._scored:  # compiled on first use: most servers never score
            self._scored.add(length)
            self.log(f"compiling the scoring pass for {length} tokens")
        padded = np.zeros((1, length), np.int32)
        padded[0, : len(ids)] = ids
        logits = self._score(self.engine.params, padded)[0, : len(ids) - 1, : self.cfg.vocab_size]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        top_lp, top_id = jax.device_get(jax.lax.top_k(logp, max(k, 1)))
        targets = jnp.asarray(np.asarray(ids[1:], np.int32))[:, None]
        chosen = np.asarray(jnp.take_along_axis(logp, targets, axis=1)[:, 0])
        return [(ids[0], None, [])] + [(ids[i + 1], float(chosen[i]), list(zip(top_id[i, :k].tolist(),
                                                                               top_lp[i, :k].tolist())))
                                       for i in range(len(ids) - 1)]
