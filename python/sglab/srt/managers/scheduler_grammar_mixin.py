"""Structured outputs on the scheduler: each constrained request's grammar compiles in the
backend's thread while the request waits; it is admitted once compiled (or refused with a 400
if its grammar is invalid), and its matcher follows its tokens from then on."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sglab.srt.constrained.grammar_backend import create_grammar_backend, grammar_key
from sglab.srt.managers.schedule_batch import Req, finish_abort

if TYPE_CHECKING:
    from sglab.srt.managers.scheduler import Scheduler


class SchedulerGrammarMixin:
    def init_grammar_backend(self: Scheduler) -> None:
        args = self.server_args
        self.grammar_backend, self.grammar_refusal = create_grammar_backend(
            args.grammar_backend, self.tokenizer, self.model_config.vocab_size,
            self.eos_token_ids, not args.constrained_json_disable_any_whitespace)

    def submit_grammar(self: Scheduler, req: Req) -> str | None:
        """Start compiling `req`'s grammar, if it has one; the refusal message, if any."""
        key = grammar_key(req.sampling_params)
        if key is None:
            return None
        if self.grammar_backend is None:
            return self.grammar_refusal
        req.grammar_future = self.grammar_backend.submit(key)
        return None

    def grammar_ready(self: Scheduler, req: Req) -> bool:
        """Whether `req` may be admitted: no grammar, or its grammar compiled (a request whose
        grammar failed to compile is finished with a 400 and leaves the queue)."""
        future = req.grammar_future
        if future is None:
            return True
        if not future.done():
            return False
        req.grammar_future = None
        try:
            req.grammar = self.grammar_backend.new_grammar(future.result())
        except ValueError as e:
            self.waiting_queue.remove(req)
            req.finished_reason = finish_abort(str(e), status_code=400)
            self.stream_output([req])
            return False
        return True
