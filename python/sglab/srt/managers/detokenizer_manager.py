"""The detokenizer process: incremental detokenization of the scheduler's token deltas."""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass, field
from typing import Any

import zmq

from sglab.srt.managers.io_struct import BatchStrOutput, BatchTokenIDOutput
from sglab.srt.server_args import PortArgs, ServerArgs, configure_logging
from sglab.srt.utils.hf_transformers_utils import get_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class DecodeStatus:
    """Per-request detokenization state, alive from the first output to the finishing one."""

    decode_ids: list[int] = field(default_factory=list)  # every output id so far
    decoded_text: str = ""  # text of decode_ids[:read_offset], complete characters only
    surr_offset: int = 0  # decode_ids[surr_offset:read_offset] is the context of the next decode
    read_offset: int = 0  # first id whose text is not yet in decoded_text
    sent_offset: int = 0  # characters of the output already sent


class IncrementalDetokenizer:
    """Turns per-request token deltas into per-request text deltas.

    Each step decodes `decode_ids[surr_offset:]` and `decode_ids[surr_offset:read_offset]` and
    keeps the difference, so merges across the boundary (leading spaces, multi-token
    characters) come out as a full decode would. Text ending in an incomplete UTF-8 sequence
    ("\\ufffd") is not committed; only its printable prefix is sent. While a request runs, a
    tail that could be the start of one of its stop strings is held back, so a stop string
    trimmed on the finishing message was never streamed.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.decode_status: dict[str, DecodeStatus] = {}

    def decode(self, recv: BatchTokenIDOutput) -> list[str]:
        """The new text of each request in `recv`; frees the state of finished requests."""
        states = [self.decode_status.setdefault(rid, DecodeStatus()) for rid in recv.rids]
        read_ids, surr_ids = [], []
        for i, s in enumerate(states):
            num_new = len(recv.output_ids[i])
            s.decode_ids.extend(recv.output_ids[i])
            ids = s.decode_ids[s.surr_offset:]
            if _trims_stop_token(recv.finished_reasons[i], recv.no_stop_trim[i]) and num_new:
                ids = ids[:-1]
            read_ids.append(ids)
            surr_ids.append(s.decode_ids[s.surr_offset:s.read_offset])
        read_texts = self._batch_decode(read_ids, recv)
        surr_texts = self._batch_decode(surr_ids, recv)

        outputs = []
        for i, s in enumerate(states):
            finished = recv.finished_reasons[i] is not None
            new_text = read_texts[i][len(surr_texts[i]):]
            if not finished:
                if new_text and not new_text.endswith("\ufffd"):
                    s.decoded_text += new_text
                    s.surr_offset, s.read_offset = s.read_offset, len(s.decode_ids)
                    new_text = ""
                else:
                    new_text = find_printable_text(new_text)
            outputs.append(self._emit(s, s.decoded_text + new_text, recv, i))
            if finished:
                del self.decode_status[recv.rids[i]]
        return outputs

    def _emit(self, s: DecodeStatus, text: str, recv: BatchTokenIDOutput, i: int) -> str:
        reason = recv.finished_reasons[i]
        trim = not recv.no_stop_trim[i]
        if reason is not None:
            matched = reason.get("matched") if trim else None
            if isinstance(matched, str) and matched:
                pos = text.find(matched, s.sent_offset)
                pos = text.find(matched) if pos == -1 else pos
                text = text if pos == -1 else text[:pos]
        elif trim and recv.stop_strs[i]:
            text = text[:len(text) - stop_prefix_len(text, recv.stop_strs[i])]
        delta = text[s.sent_offset:]
        s.sent_offset = max(s.sent_offset, len(text))
        return delta

    def _batch_decode(self, ids: list[list[int]], recv: BatchTokenIDOutput) -> list[str]:
        """batch_decode grouped by the two per-request decoding options."""
        groups: dict[tuple[bool, bool], list[int]] = {}
        for i in range(len(ids)):
            key = (recv.skip_special_tokens[i], recv.spaces_between_special_tokens[i])
            groups.setdefault(key, []).append(i)
        texts = [""] * len(ids)
        for (skip, spaces), idx in groups.items():
            decoded = self.tokenizer.batch_decode(
                [ids[i] for i in idx], skip_special_tokens=skip,
                spaces_between_special_tokens=spaces,
            )
            for i, t in zip(idx, decoded):
                texts[i] = t
        return texts


def _trims_stop_token(reason: dict | None, no_stop_trim: bool) -> bool:
    if reason is None or no_stop_trim:
        return False
    matched = reason.get("matched")
    return isinstance(matched, int) and not isinstance(matched, bool)


def stop_prefix_len(text: str, stop_strs: list[str]) -> int:
    """Length of the longest suffix of `text` that is a prefix of some stop string."""
    best = 0
    for stop in stop_strs:
        for k in range(min(len(stop), len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


def find_printable_text(text: str) -> str:
    """The prefix of `text` that is safe to send before the next token arrives."""
    if text.endswith("\n"):
        return text
    if text and _is_cjk_char(ord(text[-1])):
        return text
    if len(text) > 1 and _is_cjk_char(ord(text[-2])):
        return text[:-1]
    return text[: text.rfind(" ") + 1]


def _is_cjk_char(cp: int) -> bool:
    return (
        0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F
    )


class DetokenizerManager:
    """PULL from the scheduler, detokenize, PUSH to the TokenizerManager."""

    def __init__(self, server_args: ServerArgs, port_args: PortArgs):
        self.context = zmq.Context(2)
        self.recv_from_scheduler = self.context.socket(zmq.PULL)
        self.recv_from_scheduler.setsockopt(zmq.RCVHWM, 0)
        self.recv_from_scheduler.bind(port_args.detokenizer_ipc_name)
        self.send_to_tokenizer = self.context.socket(zmq.PUSH)
        self.send_to_tokenizer.setsockopt(zmq.SNDHWM, 0)
        self.send_to_tokenizer.connect(port_args.tokenizer_ipc_name)
        tokenizer = get_tokenizer(server_args.tokenizer_path, server_args.trust_remote_code)
        self.detokenizer = IncrementalDetokenizer(tokenizer)

    def event_loop(self) -> None:
        while True:
            recv = self.recv_from_scheduler.recv_pyobj()
            for obj in recv if isinstance(recv, list) else [recv]:
                self.send_to_tokenizer.send_pyobj(self.handle(obj))

    def handle(self, obj: Any) -> Any:
        if isinstance(obj, BatchTokenIDOutput):
            return BatchStrOutput(token_output=obj, output_strs=self.detokenizer.decode(obj))
        return obj  # anything else passes through unchanged


def run_detokenizer_process(server_args: ServerArgs, port_args: PortArgs) -> None:
    configure_logging(server_args.log_level, " Detokenizer")
    try:
        DetokenizerManager(server_args, port_args).event_loop()
    except Exception:
        logger.error("DetokenizerManager hit an exception:\n%s", traceback.format_exc())
        raise
