"""`brim facts`: a checkpoint's facts as one line for a termination message, no weights read."""

from __future__ import annotations

import json

import pytest

from brim.runtime.cli import main
from brim.runtime.planner.facts import decode_facts, read_checkpoint


def test_facts_round_trip_through_the_output_file(tmp_path, capsys):
    np = pytest.importorskip("numpy")
    from safetensors.numpy import save_file

    folder = tmp_path / "model"
    folder.mkdir()
    config = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
              "vocab_size": 100, "max_position_embeddings": 512, "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 256, "chat_template": "x" * 10000}))  # not carried
    save_file({"model.embed_tokens.weight": np.zeros((100, 64), np.float32)},
              str(folder / "model.safetensors"))
    output = tmp_path / "termination-log"
    assert main(["facts", str(folder), "--output", str(output)]) == 0
    line = capsys.readouterr().out.strip()
    assert output.read_text() == line and len(line) < 4096
    facts = decode_facts(line)
    assert facts.config == config and facts.tokenizer_max_length == 256
    assert facts.checkpoint_weights_bytes(2, 1) == \
        read_checkpoint(folder).checkpoint_weights_bytes(2, 1) == 100 * 64 * 2


def test_an_unreadable_model_leaves_its_error_in_the_output(tmp_path, capsys):
    output = tmp_path / "termination-log"
    assert main(["facts", str(tmp_path / "missing"), "--output", str(output)]) == 2
    assert "has no config.json" in output.read_text()
    assert "cannot read the model" in capsys.readouterr().err


@pytest.mark.slow
def test_the_shipped_bundled_facts_are_the_converted_model_s(bundled_model_dir):
    from brim.runtime.models.bundled import bundled_facts

    shipped, converted = bundled_facts(), read_checkpoint(bundled_model_dir)
    assert shipped.model == converted.model
    assert shipped.tokenizer_max_length == converted.tokenizer_max_length
    assert shipped.eos_token_ids == converted.eos_token_ids
    for dtype_bytes in (2, 4):
        for tp in (1, 2, 4, 8):
            assert shipped.checkpoint_weights_bytes(dtype_bytes, tp) == \
                converted.checkpoint_weights_bytes(dtype_bytes, tp)
