"""A1111-style prompt chunking: known ids, padding per encoder, 75-token chunks, comma backtrack, BREAK, emphasis."""

import pytest

from lib_copier.models.tokenizer import (
    BOS_ID,
    CHUNK_LENGTH,
    COMMA_ID,
    END_ID,
    OPENCLIP_PAD_ID,
    PromptTokenizer,
    bpe,
    parse_prompt_attention,
)

CLIP = PromptTokenizer(END_ID)
OPENCLIP = PromptTokenizer(OPENCLIP_PAD_ID)


def content(chunk) -> list[int]:
    """The prompt tokens of a chunk: between BOS and the first END."""
    assert chunk.ids[0] == BOS_ID and len(chunk.ids) == CHUNK_LENGTH
    return chunk.ids[1 : chunk.ids.index(END_ID)]


def test_special_ids_are_the_vocabulary_s():
    vocab = bpe().encoder
    assert (vocab["<start_of_text>"], vocab["<end_of_text>"], vocab[",</w>"]) == (BOS_ID, END_ID, COMMA_ID)


def test_known_ids_and_padding_per_encoder():
    prompt_ids = [320, 1125, 539, 320, 2368]  # "a photo of a cat" in CLIP's vocabulary
    (sd1,) = CLIP.chunks("A photo of a  cat")  # case and spacing are cleaned away
    assert sd1.ids == [BOS_ID, *prompt_ids, END_ID] + [END_ID] * 70
    (sd2,) = OPENCLIP.chunks("a photo of a cat")
    assert sd2.ids == [BOS_ID, *prompt_ids, END_ID] + [0] * 70
    assert sd1.weights == [1.0] * CHUNK_LENGTH


def test_empty_prompt_is_one_chunk_of_start_end_padding():
    assert CLIP.chunks("")[0].ids == [BOS_ID, END_ID] + [END_ID] * 75
    assert [c.ids for c in OPENCLIP.chunks("")] == [[BOS_ID, END_ID] + [0] * 75]
    assert OPENCLIP.chunks("") == [OPENCLIP.empty_chunk()]


@pytest.mark.parametrize(("words", "chunks"), [(74, 1), (75, 1), (76, 2), (100, 2), (150, 2), (151, 3)])
def test_75_prompt_tokens_per_chunk(words, chunks):
    prompt = " ".join(["cat"] * words)
    result = CLIP.chunks(prompt)
    assert len(result) == chunks
    assert sum((content(c) for c in result), []) == CLIP.encode(prompt)


def test_comma_backtrack_moves_the_last_phrase_to_the_next_chunk():
    cat, dog = CLIP.encode("cat dog")
    prompt = " ".join(["cat"] * 70) + ", " + " ".join(["dog"] * 10)
    first, second = CLIP.chunks(prompt)
    # The chunk fills at 70 cats, the comma and 4 dogs; the comma is 5 tokens back, within 20: the dogs move.
    assert content(first) == [cat] * 70 + [COMMA_ID]
    assert first.ids[72:] == [END_ID] * 5
    assert content(second) == [dog] * 10
    first, second = PromptTokenizer(END_ID, comma_backtrack=0).chunks(prompt)
    assert content(first) == [cat] * 70 + [COMMA_ID] + [dog] * 4 and content(second) == [dog] * 6


def test_a_comma_further_back_than_20_tokens_is_ignored():
    cat, dog = CLIP.encode("cat dog")
    prompt = " ".join(["cat"] * 50) + ", " + " ".join(["dog"] * 30)  # comma at index 50: 25 tokens back
    first, second = CLIP.chunks(prompt)
    assert content(first) == [cat] * 50 + [COMMA_ID] + [dog] * 24 and content(second) == [dog] * 6


def test_break_ends_a_chunk():
    a, b = CLIP.encode("a b")
    assert [content(c) for c in CLIP.chunks("a BREAK b")] == [[a], [b]]
    assert [content(c) for c in CLIP.chunks("BREAK a")] == [[], [a]]
    assert [content(c) for c in CLIP.chunks("a BREAK")] == [[a]]
    assert [content(c) for c in CLIP.chunks("(a BREAK b)")] == [[a], [b]]
    literal = PromptTokenizer(END_ID, emphasis=False).chunks("a BREAK b")
    assert [content(c) for c in literal] == [CLIP.encode("a break b")]


def test_attention_parsing_follows_a1111():
    assert parse_prompt_attention("normal text") == [("normal text", 1.0)]
    assert parse_prompt_attention("an (important) word") == [("an ", 1.0), ("important", 1.1), (" word", 1.0)]
    assert parse_prompt_attention("(unbalanced") == [("unbalanced", 1.1)]
    assert parse_prompt_attention(r"\(literal\]") == [("(literal]", 1.0)]
    assert parse_prompt_attention("(unnecessary)(parens)") == [("unnecessaryparens", 1.1)]
    pieces = parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    assert [text for text, _ in pieces] == ["a ", "house", " ", "on", " a ", "hill", ", sun, ", "sky", "."]
    assert [w for _, w in pieces] == pytest.approx([1.0, 1.573, 1.1, 1.0, 1.1, 0.55, 1.1, 1.4641, 1.1])
    assert parse_prompt_attention("(a: 1.5 ) b) c]") == [("a", 1.5), (" b) c]", 1.0)]
    assert parse_prompt_attention("(x:1.2.3)") == [("x:1.2.3)", 1.1)]  # not a number: literal text
    assert parse_prompt_attention("") == [("", 1.0)]


def test_weights_follow_their_tokens():
    (chunk,) = CLIP.chunks("a (red:1.5) [cat]")
    assert chunk.weights[:5] == pytest.approx([1.0, 1.0, 1.5, 1 / 1.1, 1.0])
    assert chunk.weights[5:] == [1.0] * 72
    (literal,) = PromptTokenizer(END_ID, emphasis=False).chunks("a (red:1.5)")
    assert content(literal) == CLIP.encode("a (red:1.5)") and set(literal.weights) == {1.0}


def test_batch_pads_short_prompts_with_empty_chunks():
    ids, weights = OPENCLIP.batch(["a cat", " ".join(["cat"] * 100)])
    assert ids.shape == weights.shape == (2, 2, CHUNK_LENGTH)
    assert ids[0, 1].tolist() == OPENCLIP.empty_chunk().ids
    assert ids[1, 1, 1:27].tolist() == CLIP.encode("cat") * 25 + [END_ID]
