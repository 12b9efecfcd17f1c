"""Continuous batching: one worker thread owns the model and decodes every active request together.

A request (a `Job`: prompt token ids, its own sampling settings and stop rules; what the worker keeps of it while it
decodes is a `Row`, both in `tunelab.chat.jobs`) joins the batch at a step boundary: the newcomers are prefilled
together (left-padded), their KV cache is left-padded to the batch's length and stacked under it, and from then on
each step feeds one token per sequence through the model at once. A sequence that finishes (a stop word, EOS,
max_tokens) or whose client went away (`Job.cancel()`) leaves the batch at the next step; columns of the cache that
only padding uses any more are cut off.

A failure fails only the requests it belongs to. A prefill that fails (e.g. out of memory on a long prompt) is
retried one newcomer at a time, so only the request whose own prefill fails gets the error; the batch already decoding
is left as it was and goes on. A failure in the decode step that every sequence shares ends that batch's requests
with the error (none of them can go on); requests still waiting start a new batch at the next step.

Padding never changes a sequence's results beyond float noise: padded positions are masked out of attention and
every sequence keeps its own position ids, so a greedy reply in a batch is the reply served alone (tests/test_serve.py).

A job may carry a grammar (`Job.constraint`, from `tunelab.chat.grammar`): its row then holds a matcher, and each step
the logits of the constrained rows alone lose every token their grammar does not allow next, before sampling (greedy
or not, with the row's own settings); the chosen token moves the matcher on, and a reply ends when its grammar takes a
stop token (the grammar complete). A step with no constrained row does no mask work at all.

The cache is transformers' `DynamicCache`; stacking and cutting work on its plain layers' key/value tensors
(`[batch, heads, tokens, head_dim]`). Models whose cache is anything else (sliding-window layers, recurrent state)
are served one request at a time by the same loop, which then never stacks caches.
transformers' own `ContinuousBatchingManager` was not used: it samples with one setting for the whole batch and has
no repetition penalty or per-request seed, and it needs its paged attention kernels.
"""

from __future__ import annotations

import inspect
import queue
import sys
import threading
from collections import deque

import torch
import torch.nn.functional as F

from tunelab.chat.jobs import Job, OffGrammar, Reply, Row, ServerStopping
from tunelab.chat.logprobs import prompt_logprobs, step_logprobs, trim_to_text
from tunelab.model.generate import next_tokens


def _call(callback, value) -> None:
    """A consumer that went away (a closed event loop) must not stop the worker."""
    if callback is not None:
        try:
            callback(value)
        except Exception:  # noqa: BLE001
            pass


class Batcher:
    """The worker thread and its batch. `submit(job)` from any thread; `stop()` fails what is left and ends it."""

    def __init__(self, model, tokenizer, *, max_batch_size: int = 16, prefill_tokens: int = 16384):
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.prefill_tokens = prefill_tokens
        self._new_cache = lambda: DynamicCache(config=model.config)
        try:
            layers = self._new_cache().layers
        except Exception:  # noqa: BLE001 (a config transformers cannot lay a cache out for: the model makes its own)
            self._new_cache, layers = lambda: None, []
        self.batchable = bool(layers) and all(type(layer) is DynamicLayer for layer in layers)
        if max_batch_size > 1 and not self.batchable:
            print("note: this model's KV cache (sliding-window or recurrent layers) cannot be stacked: requests are "
                  "answered one at a time", file=sys.stderr, flush=True)
        self.max_batch_size = max_batch_size if self.batchable else 1
        forward = getattr(model, "get_base_model", lambda: model)().forward
        params = inspect.signature(forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"  # renamed after transformers 5.17
        self.keep_last_logits = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.inbox: queue.Queue = queue.Queue()
        self.waiting: deque[Job] = deque()
        self.rows: list[Row] = []
        self.cache = self.mask = self.last = None
        self.finished: deque[Reply] = deque(maxlen=256)
        """The latest replies, newest last: how each request ended and how many tokens it took."""
        self.stopping = False
        self.thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    @property
    def active(self) -> int:
        """Requests in the batch or waiting for a place in it."""
        return len(self.rows) + len(self.waiting) + self.inbox.qsize()

    def submit(self, job: Job) -> None:
        if self.stopping:
            raise ServerStopping("the server is shutting down")
        with self._start_lock:
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, daemon=True, name="tunelab-generate")
                self.thread.start()
        self.inbox.put(job)
        if self.stopping and not self.thread.is_alive():  # stopped while this was being put: answer it here
            self._fail_all(ServerStopping("the server is shutting down"))

    def stop(self, timeout: float = 10.0) -> None:
        """Finish every request now (its consumer gets `ServerStopping`) and end the worker after its current step."""
        self.stopping = True
        self.inbox.put(None)
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)

    # ------------------------------------------------------------------ the worker
    def _run(self) -> None:
        with torch.inference_mode():
            while not self.stopping:
                self._collect(block=not self.rows and not self.waiting)
                if self.stopping:
                    break
                self._drop_cancelled()
                try:
                    self._step()
                except Exception as exc:  # noqa: BLE001 (a failed step fails its batch, not the server)
                    self._fail_batch(exc)
        self._fail_all(ServerStopping("the server is shutting down"))

    def _collect(self, block: bool) -> None:
        try:
            job = self.inbox.get() if block else self.inbox.get_nowait()  # idle: sleep until a job (or stop)
            while True:
                if job is not None:
                    self.waiting.append(job)
                job = self.inbox.get_nowait()
        except queue.Empty:
            pass

    def _finish(self, row: Row, reason: str) -> None:
        reply = Reply(row.text.finish() if reason != "cancelled" else row.text.text, reason,
                      len(row.job.prompt_ids), len(row.generated), list(row.generated))
        if reason == "stop" and row.job.logprobs is not None and not row.job.prompt_logprobs:
            trim_to_text(row.job.token_logprobs, row.generated, reply.text, self.tokenizer)
        self.finished.append(reply)
        _call(row.job.on_done, reply)

    def _drop_cancelled(self) -> None:
        for job in [j for j in self.waiting if j.cancelled]:
            self.waiting.remove(job)
            self.finished.append(reply := Reply("", "cancelled", len(job.prompt_ids), 0))
            _call(job.on_done, reply)
        gone = [i for i, row in enumerate(self.rows) if row.job.cancelled]
        for i in gone:
            self._finish(self.rows[i], "cancelled")
        if gone:
            self._keep([i for i in range(len(self.rows)) if i not in gone])

    def _fail_all(self, error: Exception) -> None:
        jobs = [row.job for row in self.rows] + list(self.waiting)
        self.rows, self.waiting = [], deque()
        self.cache = self.mask = self.last = None
        if self.stopping:  # also what is still in the inbox
            while True:
                try:
                    job = self.inbox.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    jobs.append(job)
        for job in jobs:
            _call(job.on_done, error)

    def _fail_batch(self, error: Exception) -> None:
        """The shared decode step failed: no sequence in the batch can go on. Waiting jobs stay for the next step."""
        jobs = [row.job for row in self.rows]
        self.rows = []
        self.cache = self.mask = self.last = None
        self._release(error)
        for job in jobs:
            _call(job.on_done, error)

    def _release(self, error: Exception) -> None:
        """Free what a failed step allocated: the tensors its traceback's frames hold, the allocator's cached blocks."""
        error.__traceback__ = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _step(self) -> None:
        logits = []
        if self.rows:
            try:
                logits.append(self._decode())
            except Exception as exc:  # noqa: BLE001 (e.g. out of memory in the step every sequence shares)
                self._fail_batch(exc)
        new = self._admit()
        if new:
            logits += self._prefill_each(new)
        if not self.rows:
            return
        logits = torch.cat(logits)
        constrained = [(i, row.matcher) for i, row in enumerate(self.rows) if row.matcher is not None]
        if constrained:
            from tunelab.chat.grammar import mask_outside_grammars

            logits = logits.float()  # as next_tokens samples them; torch.cat made them, so the masks may write there
            mask_outside_grammars(logits, constrained)
        tokens = next_tokens(logits, self.rows)
        self.last = torch.tensor(tokens, device=self.device)
        logprobs = step_logprobs(logits, tokens, [row.job.logprobs for row in self.rows])
        done = {}
        for i, (row, token) in enumerate(zip(self.rows, tokens)):
            try:
                reason = row.take(token)
            except OffGrammar as exc:  # that reply alone fails
                reason = exc
            # an EOS or a stop word's last token is no part of the text, but for a job counting every token
            if i in logprobs and (reason != "stop" or row.job.prompt_logprobs):
                row.job.token_logprobs.append(logprobs[i])
            if reason:
                done[i] = reason
        for i, reason in done.items():
            if isinstance(reason, Exception):
                _call(self.rows[i].job.on_done, reason)
            else:
                self._finish(self.rows[i], reason)
        if done:
            self._keep([i for i in range(len(self.rows)) if i not in done])

    def _admit(self) -> list[Job]:
        """The waiting jobs that join now: as many as there is room for, within the prefill token budget."""
        room = self.max_batch_size - len(self.rows)
        new: list[Job] = []
        while self.waiting and len(new) < room:
            longest = max([len(j.prompt_ids) for j in new] + [len(self.waiting[0].prompt_ids)])
            if new and longest * (len(new) + 1) > self.prefill_tokens:
                break
            new.append(self.waiting.popleft())
        return new

    def _forward(self, ids, mask, positions, cache, **extra):
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{self.cache_kwarg: cache}, **extra)
        returned = next((out[k] for k in ("cache", "past_key_values") if k in out and out[k] is not None), cache)
        return out.logits, returned

    def _decode(self) -> torch.Tensor:
        """One token for every sequence in the batch: the logits of the next one."""
        positions = self.mask.sum(-1, keepdim=True)  # each sequence's own next position, padding not counted
        self.mask = F.pad(self.mask, (0, 1), value=1)
        logits, self.cache = self._forward(self.last[:, None], self.mask, positions, self.cache)
        return logits[:, -1]

    def _prefill_each(self, jobs: list[Job]) -> list[torch.Tensor]:
        """Prefill the newcomers together, or where that fails, each alone: only a request whose own prefill fails
        (e.g. out of memory on a long prompt) gets the error, and the sequences already decoding go on untouched."""
        try:
            return [self._prefill(jobs)]
        except Exception as exc:  # noqa: BLE001 (the newcomers are not rows yet: tell them here)
            error = exc
        self._release(error)
        if len(jobs) == 1:
            _call(jobs[0].on_done, error)
            return []
        return [logits for job in jobs for logits in self._prefill_each([job])]

    def _prefill(self, jobs: list[Job]) -> torch.Tensor:
        """Run the newcomers' prompts (left-padded to the longest) and stack their cache under the batch's. All or
        nothing: when it fails, the batch is as it was."""
        rows = [Row(job, self.tokenizer, self.device) for job in jobs]
        width = max(len(job.prompt_ids) for job in jobs)
        ids = torch.tensor([[self.pad_id] * (width - len(j.prompt_ids)) + j.prompt_ids for j in jobs],
                           device=self.device)
        mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in jobs],
                            device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        images = [job.pixel_values for job in jobs if job.pixel_values is not None]
        extra = {"pixel_values": torch.cat(images).to(self.device)} if images else {}  # row by row, as the tokens
        every_place = any(job.prompt_logprobs for job in jobs)  # else the model computes the last place's alone
        logits, cache = self._forward(ids, mask, positions, self._new_cache(),
                                      **({} if every_place else self.keep_last_logits), **extra)
        for job, row_logits in zip(jobs, logits):
            if job.prompt_logprobs:
                job.prompt_token_logprobs = prompt_logprobs(row_logits[width - len(job.prompt_ids):],
                                                            job.prompt_ids, job.logprobs or 0)
        self._stack(cache, mask)
        self.rows += rows
        return logits[:, -1]

    def _stack(self, cache, mask: torch.Tensor) -> None:
        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        running, old_width = self.mask.shape
        width = max(old_width, mask.shape[1])
        try:
            for old, new in zip(self.cache.layers, cache.layers):
                old.keys = torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)])
                old.values = torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)])
            stacked = torch.cat([F.pad(self.mask, (width - old_width, 0)), F.pad(mask, (width - mask.shape[1], 0))])
        except BaseException:
            # out of memory half-way: the layers already stacked go back to the running rows and their columns
            # (views of the stacked tensors: nothing new is allocated; the next step's cache update copies them)
            for layer in self.cache.layers:
                if layer.keys.shape[0] != running:
                    layer.keys = layer.keys[:running, :, -old_width:]
                if layer.values.shape[0] != running:
                    layer.values = layer.values[:running, :, -old_width:]
            raise
        self.mask = stacked

    def _keep(self, indices: list[int]) -> None:
        """Keep only these sequences; cut the cache columns that only padding still uses."""
        self.rows = [self.rows[i] for i in indices]
        if not indices:
            self.cache = self.mask = self.last = None
            return
        index = torch.tensor(indices, device=self.device)
        self.mask, self.last = self.mask[index], self.last[index]
        first = int(self.mask.any(0).int().argmax())  # the first column some sequence uses
        self.mask = self.mask[:, first:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, first:], layer.values[index, :, first:]


def _left_pad(x: torch.Tensor, width: int) -> torch.Tensor:
    """[batch, heads, tokens, dim] padded with zeros before the tokens, to `width` tokens."""
    return F.pad(x, (0, 0, width - x.shape[-2], 0))
