"""Incremental detokenization: text deltas that never split a UTF-8 character, with stop strings.

Decoding token by token is wrong for byte-level BPE (one character may span tokens), so each
delta is the difference between decoding a short window of recent tokens with and without the
new ones; while the tail decodes to U+FFFD (an incomplete character) the text is held back. Bytes
still incomplete when the stream ends become U+FFFD, as in a full decode: the deltas always add up to
the decode of all the tokens (what the offline engine prints).
Stop strings: text that could still be the start of a stop string is held back too; when one
appears the text ends right before it.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stop: Sequence[str] = ()) -> None:
        self._tok = tokenizer
        self._ids: list[int] = list(prompt_ids[-6:])  # a little context: leading-space merges
        self._prefix = 0
        self._read = len(self._ids)
        self._stop = [s for s in stop if s]
        self._held = ""  # decoded text not yet released (a stop string may be forming)
        self.stopped = False

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def add(self, token_ids: Sequence[int]) -> str:
        """Feed new tokens; return the text that is now final (possibly empty)."""
        if self.stopped:
            return ""
        self._ids.extend(token_ids)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if after.endswith(_REPLACEMENT) or len(after) < len(before):
            return ""  # an incomplete character: wait for the rest of its bytes
        new = after[len(before) :]
        self._prefix, self._read = self._read, len(self._ids)
        return self._release(self._held + new)

    def flush(self) -> str:
        """At the end of the stream: whatever is held back (it can no longer become a stop string or a
        whole character)."""
        if self.stopped:
            return ""
        tail = self._decode(self._ids[self._prefix :])[
            len(self._decode(self._ids[self._prefix : self._read])) :
        ]
        text, self._held = self._held + tail, ""
        cut = self._first_stop(text)  # the tail was never checked (it ended inside a character)
        if cut >= 0:
            self.stopped = True
            return text[:cut]
        return text

    def _first_stop(self, text: str) -> int:
        """Where the earliest stop string starts in text, or -1."""
        return min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)

    def _release(self, text: str) -> str:
        if not self._stop:
            return text
        cut = self._first_stop(text)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return text[:cut]
        keep = max((k for s in self._stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]
