"""Drafts read from the context: prompt lookup (Saxena 2023; vLLM's n-gram speculator), the cheapest draft there
is. If the last n tokens (n = 4, 3, then 2) occurred earlier in the prompt or the output, the tokens that
followed their latest earlier occurrence are proposed as the next ones, at no model cost: the cycle is a verify
alone (Engine.lookup_cycle). Small models repeat themselves and their prompts often; measured on the default
model's own greedy answers to 320 held-out instructions (`data/self4/eval.jsonl`, 32,547 answer tokens): the last
4 tokens had an earlier occurrence at 23% of positions, whose next token was the model's at 85% of them (2.8 of
the 4 following tokens on average); 3 tokens at 4.7% more (63%), 2 tokens at 7.7% more (53%).
"""

from __future__ import annotations

NGRAM_SIZES = (4, 3, 2)  # tried longest first: a longer match predicts better


class NgramLookup:
    """The token history of one generation and, for every n-gram in it (n in `sizes`, default NGRAM_SIZES), the
    index of the token that followed its latest occurrence. O(len(sizes)) per token added, O(1) dictionary
    reads per proposal."""

    def __init__(self, tokens: list[int], sizes: tuple[int, ...] = NGRAM_SIZES):
        self.tokens: list[int] = []
        self.sizes = sizes
        self.follower: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            self.tokens.append(token)
            i = len(self.tokens) - 1  # the n-grams ending just before token i are now followed by it
            for n in self.sizes:
                if i >= n:
                    self.follower[tuple(self.tokens[i - n:i])] = i

    def propose(self, count: int) -> list[int]:
        """Up to `count` tokens that followed the latest earlier occurrence of the longest suffix of the history
        seen before (of NGRAM_SIZES tokens); [] when there is none or count < 1."""
        if count < 1:
            return []
        n, start = self.match(self.sizes)
        return self.tokens[start:start + count] if n else []

    def match(self, sizes: tuple[int, ...], after: list[int] = ()) -> tuple[int, int]:
        """(n, index of the token that followed) for the first n in `sizes` (indexed ones) whose n-gram ending
        the history, continued by the tokens `after` (not added), occurred in the history; (0, -1) if none."""
        tail = self.tokens[-max(sizes):] + list(after) if after else self.tokens
        length = len(self.tokens) + len(after)
        for n in sizes:
            if length > n:
                start = self.follower.get(tuple(tail[-n:]))
                if start is not None:
                    return n, start
        return 0, -1
