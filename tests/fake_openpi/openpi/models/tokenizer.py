"""Stand-in for openpi.models.tokenizer.PaligemmaTokenizer: a character tokenizer with openpi's framing
(BOS, the cleaned prompt, a separate newline token, padding with mask False up to ``max_len``)."""

from __future__ import annotations

import numpy as np

CALLS: list[str] = []
"""Every prompt tokenized (tests check the per-prompt cache)."""


class PaligemmaTokenizer:
    def __init__(self, max_len: int = 48) -> None:
        self._max_len = max_len

    @staticmethod
    def _encode(text: str) -> list[int]:
        return [3 + (ord(c) % 250) for c in text]

    def tokenize(self, prompt: str, state: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        CALLS.append(prompt)
        cleaned = prompt.strip().replace("_", " ").replace("\n", " ")
        if state is not None:
            bins = np.digitize(state, bins=np.linspace(-1, 1, 256 + 1)[:-1]) - 1
            tokens = [2] + self._encode(f"Task: {cleaned}, State: {' '.join(map(str, bins))};\nAction: ")
        else:
            tokens = [2] + self._encode(cleaned) + [1]
        n = len(tokens)
        if n < self._max_len:
            mask = [True] * n + [False] * (self._max_len - n)
            tokens = tokens + [False] * (self._max_len - n)
        else:
            tokens, mask = tokens[: self._max_len], [True] * self._max_len
        return np.asarray(tokens), np.asarray(mask)
