"""Prompts → CLIP token ids in 77-token chunks, cut and weighted the way AUTOMATIC1111 does it.

BPE is open_clip's `SimpleTokenizer` with the vocabulary file shipped inside the package, so nothing is downloaded.
It cleans text with ftfy, unescapes HTML, collapses whitespace and lower-cases, as the tokenizers SD was trained
with did; A1111 uses it for SD2 and SDXL's second encoder, and transformers' CLIPTokenizer (same vocabulary and
cleaning) for the CLIP-L encoder.

Rules followed, from A1111 v1.10's modules/sd_hijack_clip.py (`tokenize_line`, `forward`, `process_tokens`) and
modules/prompt_parser.py (`parse_prompt_attention`):

- Each piece of a prompt with its own emphasis weight is tokenised separately, without start/end tokens.
- A chunk holds 75 prompt tokens and is wrapped as [BOS] + tokens + [EOS] + padding to 77. Padding is END (49407)
  for the CLIP-L encoder (SD1, SDXL's first) and 0 for OpenCLIP (SD2, SDXL's second).
- Comma backtrack, 20 by default: when a chunk is full and the next token is not a comma, and the chunk's last
  comma is one of its last 20 tokens, everything after that comma moves to the next chunk, so a phrase is not cut
  in two. The comma position is forgotten at each new chunk. 0 turns it off.
- A prompt has at least one chunk; an empty one is [BOS, EOS, padding]. A full last chunk adds no empty chunk.
- In a batch, prompts with fewer chunks are padded with empty chunks, as A1111 does.
- Emphasis (on by default, A1111's "Original"): (x) multiplies x's weight by 1.1, [x] divides by 1.1, (x:w)
  multiplies by w; nesting multiplies; a bracket never closed applies to the end of the prompt; \\( \\) \\[ \\] \\\\
  are literal characters; a bracket that closes nothing is literal; start, end and padding tokens weigh 1. The
  embedders multiply each token's output by its weight, then rescale so the chunk's mean is what it was.
- "BREAK" (upper case, a word of its own) ends the chunk early, even an empty one, and a trailing BREAK adds
  nothing. Brackets around a BREAK do not weight it: A1111 multiplies its marker too, which turns `(a BREAK b)`
  into the literal word "break" with weight -1.1; we take that for the bug it is.
- With emphasis off, brackets and BREAK are literal text, as with A1111's emphasis "None".

Not supported: textual-inversion embeddings (their names are tokenised as plain words); prompt editing
`[a:b:step]` and alternation `[a|b]`, which A1111 resolves per sampling step before this point (here their
brackets are read as emphasis, as A1111's emphasis parser alone reads them); a weight that is not a number, such as
`(x:1.2.3)`, which A1111 rejects with an error and which is literal text here.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

BOS_ID = 49406  # <start_of_text>
END_ID = 49407  # <end_of_text>; also SD1's padding
OPENCLIP_PAD_ID = 0  # open_clip pads with 0 (which is "!"), and SD2/SDXL were trained that way
COMMA_ID = 267  # ",</w>"
CHUNK_TOKENS = 75
CHUNK_LENGTH = CHUNK_TOKENS + 2
COMMA_BACKTRACK = 20

BREAK = None  # the marker `parse_prompt_attention` puts where a chunk must end


@functools.lru_cache(maxsize=1)
def bpe():
    """open_clip's tokenizer, built once; importing open_clip is slow, so it waits until the first prompt."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


_ATTENTION = re.compile(
    r"""
      \\[()\[\]\\]          # an escaped bracket or backslash: the character itself
    | \\                    # a lone backslash: dropped
    | \( | \[               # open
    | :\s*([+-]?[.\d]+)\s*\)  # close a round bracket with an explicit weight
    | \) | \]               # close
    | [^\\()\[\]:]+         # plain text
    | :
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
ROUND, SQUARE = 1.1, 1 / 1.1


def parse_prompt_attention(text: str) -> list[tuple[str, float] | None]:
    """`(text, weight)` pieces in prompt order, with `BREAK` (None) where the prompt says BREAK.

    Adjacent pieces of equal weight are merged, so an unweighted prompt is one piece.
    """
    pieces: list[list | None] = []  # [text, weight] while weights are still being multiplied
    open_round: list[int] = []
    open_square: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if piece is not BREAK:
                piece[1] *= factor

    def literal(chunk: str) -> None:
        for i, part in enumerate(_BREAK.split(chunk)):
            if i:
                pieces.append(BREAK)
            pieces.append([part, 1.0])

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(pieces))
        elif token == "[":
            open_square.append(len(pieces))
        elif weight is not None and open_round and _is_number(weight):
            multiply_from(open_round.pop(), float(weight))
        elif token == ")" and open_round:
            multiply_from(open_round.pop(), ROUND)
        elif token == "]" and open_square:
            multiply_from(open_square.pop(), SQUARE)
        else:
            literal(token)
    for start in open_round:
        multiply_from(start, ROUND)
    for start in open_square:
        multiply_from(start, SQUARE)

    merged: list[tuple[str, float] | None] = []
    for piece in pieces or [["", 1.0]]:
        previous = merged[-1] if merged else BREAK
        if piece is not BREAK and previous is not BREAK and previous[1] == piece[1]:
            merged[-1] = (previous[0] + piece[0], piece[1])
        else:
            merged.append(piece if piece is BREAK else (piece[0], piece[1]))
    return merged


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass
class Chunk:
    ids: list[int]  # CHUNK_LENGTH token ids
    weights: list[float]  # one emphasis weight per id


class PromptTokenizer:
    """A1111's prompt chunking for one text encoder; `pad_id` is END_ID for CLIP-L, OPENCLIP_PAD_ID for OpenCLIP."""

    def __init__(self, pad_id: int = END_ID, comma_backtrack: int = COMMA_BACKTRACK, emphasis: bool = True):
        self.pad_id = pad_id
        self.comma_backtrack = comma_backtrack
        self.emphasis = emphasis

    def encode(self, text: str) -> list[int]:
        """Plain BPE ids, no start/end tokens."""
        return bpe().encode(text)

    def wrap(self, ids: list[int], weights: list[float]) -> Chunk:
        padding = CHUNK_TOKENS - len(ids)
        return Chunk([BOS_ID, *ids, END_ID] + [self.pad_id] * padding, [1.0, *weights, 1.0] + [1.0] * padding)

    def empty_chunk(self) -> Chunk:
        return self.wrap([], [])

    def chunks(self, prompt: str) -> list[Chunk]:
        pieces = parse_prompt_attention(prompt) if self.emphasis else [(prompt, 1.0)]
        done: list[Chunk] = []
        ids: list[int] = []
        weights: list[float] = []
        last_comma = -1

        def close() -> None:
            nonlocal ids, weights, last_comma
            done.append(self.wrap(ids, weights))
            ids, weights, last_comma = [], [], -1

        for piece in pieces:
            if piece is BREAK:
                close()
                continue
            text, weight = piece
            for token in self.encode(text):
                if token == COMMA_ID:
                    last_comma = len(ids)
                elif len(ids) == CHUNK_TOKENS and last_comma >= 0 and len(ids) - last_comma <= self.comma_backtrack:
                    cut = last_comma + 1
                    moved_ids, moved_weights = ids[cut:], weights[cut:]
                    ids, weights = ids[:cut], weights[:cut]
                    close()
                    ids, weights = moved_ids, moved_weights
                if len(ids) == CHUNK_TOKENS:
                    close()
                ids.append(token)
                weights.append(weight)
        if ids or not done:
            close()
        return done

    def batch(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (long) and weights (float32), both [len(prompts), chunks, 77]; short prompts get empty chunks."""
        per_prompt = [self.chunks(p) for p in prompts]
        count = max((len(c) for c in per_prompt), default=1)
        padded = [c + [self.empty_chunk()] * (count - len(c)) for c in per_prompt]
        ids = torch.tensor([[c.ids for c in chunks] for chunks in padded], dtype=torch.long)
        weights = torch.tensor([[c.weights for c in chunks] for chunks in padded], dtype=torch.float32)
        return ids.reshape(len(prompts), count, CHUNK_LENGTH), weights.reshape(len(prompts), count, CHUNK_LENGTH)
