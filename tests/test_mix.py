"""export/mix.py without a model: which tensors the merged route keeps at the adapted type."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_annotator.export.mix import adapted_tensors

SIZES = {f"model.layers.{i}.{m}.weight": 8 for i in range(3)
         for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj", "input_layernorm")}
SIZES |= {"model.embed_tokens.weight": 64, "model.norm.weight": 4}


def _merged(tmp_path: Path, lora: dict) -> Path:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Gemma3ForCausalLM"], "num_hidden_layers": 3}))
    (tmp_path / "provenance.json").write_text(json.dumps({"config": {"lora": lora}}))
    return tmp_path


@pytest.mark.parametrize(("layers", "expected"), [
    (None, {f"blk.{i}.{t}.weight" for i in range(3) for t in ("attn_q", "attn_v", "ffn_down")}),
    ([1, 2], {f"blk.{i}.{t}.weight" for i in (1, 2) for t in ("attn_q", "attn_v", "ffn_down")}),
    ([2], {"blk.2.attn_q.weight", "blk.2.attn_v.weight", "blk.2.ffn_down.weight"}),
])
def test_the_adapted_tensors_are_the_targets_in_the_adapted_layers(tmp_path: Path, layers: list[int] | None,
                                                                  expected: set[str]) -> None:
    """A top-layer adapter (lora.layers) changed its targets in those layers only: the layers below
    keep the base's weights and the base's type, as in the adapter route."""
    lora = {"target_modules": ["q_proj", "v_proj", "down_proj"], "layers": layers}
    assert set(adapted_tensors(_merged(tmp_path, lora), SIZES)) == expected


def test_modules_to_save_are_kept_in_every_layer_and_no_lora_keeps_nothing(tmp_path: Path) -> None:
    lora = {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"], "layers": [2]}
    assert set(adapted_tensors(_merged(tmp_path, lora), SIZES)) == {"blk.2.attn_q.weight", "token_embd.weight"}
    assert adapted_tensors(_merged(tmp_path, {}), SIZES) == {}
