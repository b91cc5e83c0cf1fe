"""IncrementalDetokenizer against the bundled tokenizer's own decode, and find_stop."""

from __future__ import annotations

import pytest

from brim.runtime.engine.detokenizer import IncrementalDetokenizer, backend_decoder, find_stop

TEXTS = [
    "héllo 世界 🎉",
    "def f(x):\n    return {'a': x**2}  # ok\n\tpass",
    "Ünïcödé — “quotes” and 👩‍👩‍👧 family, 日本語のテキスト。",
    "  leading spaces\t\ttabs\n\n\nnewlines  ",
    "🎉🎉🎉x🎉 ça va?",
]


def stream(tokenizer, prompt_ids, output_ids, skip_special_tokens=True) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
    return [detokenizer.add(token) for token in output_ids]


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_the_tokenizers_decode_at_every_split(tokenizer, text):
    ids = tokenizer.encode(text)
    whole = tokenizer.decode(ids)
    assert whole == text
    assert len(ids) > len(text.encode()) // 4  # multi-byte characters span several tokens
    for split in range(len(ids)):
        prompt_ids, output_ids = ids[:split], ids[split:]
        deltas = stream(tokenizer, prompt_ids, output_ids)
        prompt_text = tokenizer.decode(prompt_ids)
        # A prompt of token ids may stop inside a character: its bytes are not text yet,
        # and the character goes out with the output.
        assert prompt_text.rstrip("\ufffd") + "".join(deltas) == whole, split
        assert not any("\ufffd" in d for d in deltas)
        if not prompt_text.endswith("\ufffd"):
            assert "".join(deltas) == tokenizer.decode(output_ids)


def test_an_emoji_split_across_tokens_waits_until_complete(tokenizer):
    ids = tokenizer.encode("a🎉b")
    assert len(ids) > 3  # the emoji's 4 bytes take more than one token
    deltas = stream(tokenizer, ids[:1], ids[1:])
    assert deltas[0] == ""  # first bytes of the emoji only
    assert "".join(deltas) == "🎉b"
    assert [d for d in deltas if d] == ["🎉", "b"]


def test_prompt_ending_inside_a_character_keeps_the_character(tokenizer):
    ids = tokenizer.encode("x 世界")
    cut = next(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd"))
    deltas = stream(tokenizer, ids[:cut], ids[cut:])
    prompt_text = tokenizer.decode(ids[:cut]).rstrip("\ufffd")
    assert "".join(deltas) == tokenizer.decode(ids)[len(prompt_text):]
    assert "".join(deltas).endswith("界")


def test_long_output_streams_with_a_bounded_window(tokenizer):
    text = " ".join(f"word{i} 世界" for i in range(200))
    ids = tokenizer.encode(text)
    detokenizer = IncrementalDetokenizer(tokenizer, ids[:3], True)
    out = "".join(detokenizer.add(t) for t in ids[3:])
    assert tokenizer.decode(ids[:3]) + out == text
    # The decoded window restarts after every emitted delta instead of growing.
    assert len(detokenizer.ids) - detokenizer.prefix_offset < 10


def test_special_tokens_skipped_or_kept(tokenizer):
    prompt = tokenizer.encode("Hi")
    output = tokenizer.encode("<|im_start|>assistant\nYes<|im_end|>")
    assert "".join(stream(tokenizer, prompt, output, True)) == "assistant\nYes"
    kept = "".join(stream(tokenizer, prompt, output, False))
    assert kept == "<|im_start|>assistant\nYes<|im_end|>"


def test_the_rust_decode_is_used_only_where_it_equals_the_tokenizers_decode(tokenizer):
    import random

    from transformers import AutoTokenizer

    backend = backend_decoder(tokenizer)
    assert backend is not None  # the bundled tokenizer: a plain fast tokenizer
    assert backend_decoder(tokenizer) is backend  # decided once per tokenizer
    rng = random.Random(0)
    special = sorted(tokenizer.all_special_ids)
    for _ in range(300):
        ids = [rng.choice(special) if rng.random() < 0.1 else rng.randrange(len(tokenizer))
               for _ in range(rng.randrange(1, 12))]
        for skip in (True, False):
            assert (backend.decode(ids, skip_special_tokens=skip)
                    == tokenizer.decode(ids, skip_special_tokens=skip)), (ids, skip)
    # Clean-up of tokenization spaces is transformers' own step: such a tokenizer keeps
    # its decode, and the stream still matches it.
    cleaned = AutoTokenizer.from_pretrained(tokenizer.name_or_path,
                                            clean_up_tokenization_spaces=True)
    assert cleaned.clean_up_tokenization_spaces
    assert backend_decoder(cleaned) is None
    ids = cleaned.encode("a , b . c ' d")
    deltas = stream(cleaned, ids[:1], ids[1:])
    assert cleaned.decode(ids[:1]) + "".join(deltas) == cleaned.decode(ids)


# -- find_stop -------------------------------------------------------------------------------


def _stream_stops(deltas, stops):
    """find_stop after each delta, as the engine calls it: (delta index, hit) or None."""
    text = ""
    for i, delta in enumerate(deltas):
        text += delta
        hit = find_stop(text, len(delta), stops)
        if hit is not None:
            return i, hit
    return None


def test_stop_string_split_across_deltas():
    assert _stream_stops(["Hello wor", "ld. ST", "OP", " more"], ["STOP"]) == (2, (13, "STOP"))
    assert _stream_stops(["a<", "/", "answer", ">b"], ["</answer>"]) == (3, (1, "</answer>"))


def test_stop_string_inside_one_delta_and_at_its_end():
    assert find_stop("abc END", 7, ["END"]) == (4, "END")
    assert find_stop("abc END", 1, ["END"]) == (4, "END")  # ends in the new character


def test_earliest_of_several_stop_strings_wins():
    assert find_stop("one stop two END", 16, ["END", "stop"]) == (4, "stop")
    assert find_stop("xab", 3, ["b", "ab"]) == (1, "ab")
    assert _stream_stops(["say: ", "EN", "D and stop"], ["stop", "END"]) == (2, (5, "END"))


def test_no_match_on_text_checked_before():
    # "STOP" is entirely old text: a new delta that does not complete a stop finds nothing.
    assert find_stop("STOP already seen, then x", 1, ["STOP"]) is None
    assert find_stop("xSTOP", 0, ["STOP"]) is None
    assert find_stop("ab", 1, ["abc"]) is None
    assert _stream_stops(["no ", "stops ", "here"], ["STOP", "\n\n"]) is None


def test_num_new_chars_beyond_the_text_searches_everything():
    assert find_stop("STOP", 100, ["STOP"]) == (0, "STOP")
