"""Show a generation as it is decided: streamed text on stdout, its statistics on stderr."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.text import Text


class TextStream:
    """Incremental detokenization: the text of a growing token list, released only once it is final.

    Text is held back while it may still change: a trailing incomplete UTF-8 character (decoded as
    U+FFFD until the rest of its bytes arrive, as incremental detokenizers in serving engines do) and a
    tail that could be the beginning of a stop string (the returned text is cut where a stop string
    begins). What `push` returns, concatenated with `rest(final_text)`, equals the final text.
    """

    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.tokens: list[int] = []
        self.released = 0  # characters of the text handed out so far

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def push(self, tokens: list[int]) -> str:
        """Append tokens; returns the text that became final with them (may be empty)."""
        self.tokens.extend(tokens)
        text = self.decode(self.tokens)
        end = len(text.rstrip(REPLACEMENT))
        end = min(end, self._stop_free(text[:end]))
        if end <= self.released:
            return ""
        new, self.released = text[self.released:end], end
        return new

    def _stop_free(self, text: str) -> int:
        """Length of the prefix of `text` that no stop string can begin in (an occurrence is cut off)."""
        if not self.stop:
            return len(text)
        found = [text.find(s) for s in self.stop if s in text]
        if found:
            return min(found)
        longest = max(map(len, self.stop))
        for start in range(max(0, len(text) - longest + 1), len(text)):
            if any(s.startswith(text[start:]) for s in self.stop):
                return start
        return len(text)

    def rest(self, final_text: str) -> str:
        """What is left to release once generation has ended with `final_text`."""
        return final_text[self.released:]


REPLACEMENT = "\ufffd"


class TokenStreamer:
    """on_cycle callback for BalconyModel.generate: prints each cycle's new text as it becomes final.

    With show_drafts, accepted draft tokens are green, the verifier's own token plain, and rejected
    drafts (not part of the output) red and struck through. `finish(out.text)` prints what was held
    back, so stdout ends exactly where the returned text does.
    """

    def __init__(self, tokenizer, show_drafts: bool = False, stop: list[str] | tuple[str, ...] = ()):
        self.text = TextStream(tokenizer, stop)
        self.show_drafts = show_drafts
        self.console = Console(highlight=False, soft_wrap=True)

    def __call__(self, tokens: list[int], rejected: list[int]) -> None:
        if not self.show_drafts:
            sys.stdout.write(self.text.push(tokens))
            sys.stdout.flush()
            return
        line = Text()
        for i, token in enumerate(tokens):
            line.append(self.text.push([token]), style="green" if i < len(tokens) - 1 else "")
        if rejected:
            base = self.text.decode(self.text.tokens)
            with_drafts = self.text.decode(self.text.tokens + rejected)
            shown = with_drafts[len(base):] if with_drafts.startswith(base) else self.text.decode(rejected)
            line.append(shown.replace(REPLACEMENT, ""), style="red strike")
        self.console.print(line, end="")

    def finish(self, final_text: str) -> None:
        sys.stdout.write(self.text.rest(final_text) + "\n")
        sys.stdout.flush()


def print_generation_stats(stats, baseline=None, identical: bool | None = None) -> None:
    err = Console(stderr=True, highlight=False)
    parts = [f"{stats.mode}" + (f" exit {stats.exit}" if stats.exit is not None else "")
             + (f" draft-len {stats.draft_len}" if stats.draft_len is not None else "")
             + (f" width {stats.draft_width}" if (stats.draft_width or 1) > 1 else "")
             + (f" lookup-len {stats.lookup_len}" if stats.lookup_len else ""),
             f"{stats.new_tokens} tokens in {stats.seconds:.2f} s (the first after {stats.prefill_seconds:.2f} s) = "
             f"{stats.tokens_per_second:.1f} tok/s"]
    if stats.acceptance_rate is not None:
        parts.append(f"acceptance {stats.acceptance_rate:.1%}, {stats.mean_accepted_length:.2f} tokens/cycle")
    if stats.lookup_len:
        parts.append(f"{stats.lookup_cycles} of {stats.cycles} cycles verified looked-up drafts"
                     + (f" (acceptance {stats.lookup_acceptance_rate:.1%})" if stats.lookup_drafted else ""))
    if baseline is not None:
        parts.append(f"full mode {baseline.tokens_per_second:.1f} tok/s, "
                     f"speedup {stats.tokens_per_second / baseline.tokens_per_second:.2f}x"
                     + (f" ({stats.decode_tokens_per_second / baseline.decode_tokens_per_second:.2f}x after the first "
                        "token)" if stats.decode_tokens_per_second and baseline.decode_tokens_per_second else "")
                     + ", "
                     f"{'identical' if identical else 'DIFFERENT'} output")
    err.print("[dim]" + " | ".join(parts) + "[/dim]")
