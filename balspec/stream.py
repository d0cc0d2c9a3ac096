"""Show a generation as it is decided: streamed text on stdout, its statistics on stderr."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.text import Text


class TokenStreamer:
    """on_cycle callback for BalconyModel.generate: prints each cycle's new text.

    With show_drafts, accepted draft tokens are green, the verifier's own token plain, and rejected
    drafts (not part of the output) red and struck through.
    """

    def __init__(self, tokenizer, show_drafts: bool = False):
        self.tokenizer, self.show_drafts = tokenizer, show_drafts
        self.tokens: list[int] = []
        self.printed = 0
        self.console = Console(highlight=False, soft_wrap=True)

    def __call__(self, tokens: list[int], rejected: list[int]) -> None:
        if not self.show_drafts:
            self.tokens.extend(tokens)
            text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
            sys.stdout.write(text[self.printed:])
            sys.stdout.flush()
            self.printed = len(text)
            return
        line = Text()
        for i, token in enumerate(tokens):
            style = "green" if i < len(tokens) - 1 else ""
            line.append(self.tokenizer.decode([token], skip_special_tokens=True), style=style)
        if rejected:
            line.append(self.tokenizer.decode(rejected, skip_special_tokens=True), style="red strike")
        self.console.print(line, end="")

    def finish(self) -> None:
        sys.stdout.write("\n")
        sys.stdout.flush()


def print_generation_stats(stats, baseline=None, identical: bool | None = None) -> None:
    err = Console(stderr=True, highlight=False)
    parts = [f"{stats.mode}" + (f" exit {stats.exit}" if stats.exit is not None else "")
             + (f" draft-len {stats.draft_len}" if stats.draft_len is not None else "")
             + (f" width {stats.draft_width}" if (stats.draft_width or 1) > 1 else ""),
             f"{stats.new_tokens} tokens in {stats.seconds:.2f} s = {stats.tokens_per_second:.1f} tok/s"]
    if stats.acceptance_rate is not None:
        parts.append(f"acceptance {stats.acceptance_rate:.1%}, {stats.mean_accepted_length:.2f} tokens/cycle")
    if baseline is not None:
        parts.append(f"full mode {baseline.tokens_per_second:.1f} tok/s, "
                     f"speedup {stats.tokens_per_second / baseline.tokens_per_second:.2f}x, "
                     f"{'identical' if identical else 'DIFFERENT'} output")
    err.print("[dim]" + " | ".join(parts) + "[/dim]")
