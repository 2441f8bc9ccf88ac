"""Zyphra checkpoint interop: import -> forward matches an independent reference -> export is
bit-exact.

The Zyphra checkpoint is random weights written by the test in Zyphra's layout
(zyphra_reference.py).
Tolerance of the forward comparisons: our fp32 model against the float64 reference, logits
(O(1..10))
to atol = rtol = 1e-4; observed differences are ~5e-6, and a wrong mapping (transposed tensor, wrong
norm, wrong gate, swapped x/z) shows up as O(1) differences.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from megatron_blackmamba.config import ModelConfig
from megatron_blackmamba.generation.cli import load_model
from megatron_blackmamba.interop import zyphra
from tests.interop import workers
from tests.interop.zyphra_reference import (
    random_state,
    reference_logits,
    tiny_config,
    write_checkpoint,
)
from tests.multiproc import run_ranks

TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> SimpleNamespace:
    work = tmp_path_factory.mktemp("zyphra")
    cfg, state = tiny_config(), random_state(tiny_config())
    source = write_checkpoint(work / "zyphra", cfg, state)
    ckpt = zyphra.import_zyphra(source, work / "ckpt", config_out=work / "tiny_zyphra.yaml")
    tokens = torch.randint(
        0, cfg["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(3)
    )
    used: list[int] = []
    reference = reference_logits(cfg, state, tokens, experts_used=used)
    assert min(used) >= 3, "the test weights should route tokens to several experts per MoE layer"
    return SimpleNamespace(
        work=work,
        cfg=cfg,
        state=state,
        source=source,
        ckpt=ckpt,
        config=work / "tiny_zyphra.yaml",
        tokens=tokens,
        reference=reference,
    )


def test_imported_forward_matches_reference(imported):
    assert imported.ckpt.name == "iter_0000000"
    model = load_model(imported.work / "ckpt", imported.config, ["training.precision=fp32"])
    with torch.no_grad():
        ours = model(imported.tokens, None, None)
    torch.testing.assert_close(ours.double(), imported.reference, **TOL)


def test_export_round_trip_is_bit_exact(imported):
    out = zyphra.export_zyphra(imported.ckpt, imported.config, imported.work / "exported")
    assert json.loads((out / "config.json").read_text()) == imported.cfg
    exported = torch.load(out / "pytorch_model.bin", weights_only=True)["model"]
    assert sorted(exported) == sorted(imported.state)
    for name, tensor in imported.state.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name


def test_loads_at_tp2_ep2_etp2_and_matches_reference(imported):
    """4 ranks: Mamba mixers and the vocab split over TP=2, experts over EP=2 and each expert's
    (GLU) MLP over expert-TP=2; sequence parallelism is on (TP > 1)."""
    tokens_path, out_path = imported.work / "tokens.pt", imported.work / "tp2_ep2_etp2.pt"
    torch.save(imported.tokens, tokens_path)
    layout = ["parallel.tp=2", "parallel.ep=2", "parallel.etp=2"]
    run_ranks(
        4,
        workers.forward_at_layout,
        str(imported.ckpt),
        str(imported.config),
        layout,
        str(tokens_path),
        str(out_path),
    )
    result = torch.load(out_path, weights_only=True)
    assert (result["tp"], result["ep"], result["etp"]) == (2, 2, 2)
    torch.testing.assert_close(result["logits"].double(), imported.reference, **TOL)


def test_silu_gate_option_matches_reference(tmp_path):
    """--glu-activation silu reads swiglu=true as the paper's SwiGLU."""
    cfg, state = tiny_config(), random_state(tiny_config(), seed=1)
    source = write_checkpoint(tmp_path / "zyphra", cfg, state)
    zyphra.import_zyphra(
        source, tmp_path / "ckpt", config_out=tmp_path / "x.yaml", glu_activation="silu"
    )
    model = load_model(tmp_path / "ckpt", tmp_path / "x.yaml", ["training.precision=fp32"])
    tokens = torch.randint(0, cfg["vocab_size"], (1, 8))
    with torch.no_grad():
        ours = model(tokens, None, None).double()
    torch.testing.assert_close(ours, reference_logits(cfg, state, tokens, glu="silu"), **TOL)
    assert not torch.allclose(ours, reference_logits(cfg, state, tokens, glu="gelu"), **TOL)


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda s: s.pop("decoder.layers.1.mixer.router.bias"),
            r"missing tensor decoder\.layers\.1\.mixer\.router\.bias \(expected shape \(8,\)\)",
        ),
        (
            lambda s: s.__setitem__("decoder.layers.2.mixer.x_proj.weight", torch.zeros(9, 64)),
            (
                r"mismatched tensor decoder\.layers\.2\.mixer\.x_proj\.weight: expected shape \(10,"
                r" 64\), found \(9, 64\)"
            ),
        ),
        (
            lambda s: s.__setitem__("decoder.layers.0.mixer.extra", torch.zeros(1)),
            r"unexpected tensors \['decoder\.layers\.0\.mixer\.extra'\]",
        ),
    ],
)
def test_bad_tensor_is_named_with_file(tmp_path, damage, message):
    state = random_state(tiny_config())
    damage(state)
    source = write_checkpoint(tmp_path / "zyphra", tiny_config(), state)
    with pytest.raises(zyphra.ConversionError, match=message) as err:
        zyphra.import_zyphra(source, tmp_path / "ckpt")
    assert str(source / "pytorch_model.bin") in str(err.value)
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"mamba_moe_layers": ["r", "1", "r", "8"]}, r"mamba_moe_layers\[1\]='1' is not supported"),
        (
            {"mamba_moe_layers": ["r8", "8", "r", "8"]},
            r"mamba_moe_layers\[0\]='r8' is not supported",
        ),
        ({"add_bias_linear": True}, r"output_layer\.bias"),
        ({"mamba_moe_layers": ["r", "8"]}, r"2 entries, num_layers is 4"),
    ],
)
def test_unrepresentable_config_is_refused(change, message):
    with pytest.raises(zyphra.ConversionError, match=message):
        zyphra.model_fields(tiny_config(**change))


def test_missing_files_and_config_fields_are_named(tmp_path):
    with pytest.raises(zyphra.ConversionError, match="config.json not found"):
        zyphra.read_zyphra(tmp_path)
    cfg = tiny_config()
    del cfg["state_size"]
    with pytest.raises(
        zyphra.ConversionError, match=r"x\.json: missing field\(s\) \['state_size'\]"
    ):
        zyphra.model_fields(cfg, source="x.json")


def test_export_refuses_models_zyphra_computes_differently():
    with pytest.raises(zyphra.ConversionError, match="final_norm=rmsnorm"):
        zyphra.zyphra_config(ModelConfig())
    swiglu = ModelConfig(final_norm="layernorm", activation="swiglu", num_experts=8)
    with pytest.raises(zyphra.ConversionError, match="pass the matching --glu-activation"):
        zyphra.zyphra_config(swiglu)
    assert zyphra.zyphra_config(swiglu, glu_activation="silu")["swiglu"] is True


def test_save_pretrained_names_are_accepted(tmp_path):
    """Zyphra's save_pretrained writes a bare state dict with embedding.weight + tied
    output_layer.weight."""
    cfg, state = tiny_config(), random_state(tiny_config())
    bare = dict(state)
    bare["embedding.weight"] = bare.pop("embedding.word_embeddings.weight")
    bare["output_layer.weight"] = bare["embedding.weight"]
    (tmp_path / "z").mkdir()
    torch.save(bare, tmp_path / "z" / "pytorch_model.bin")
    (tmp_path / "z" / "config.json").write_text(json.dumps(cfg))
    _, read = zyphra.read_zyphra(tmp_path / "z")
    assert sorted(read) == sorted(state)
    bare["output_layer.weight"] = bare["output_layer.weight"] + 1
    torch.save(bare, tmp_path / "z" / "pytorch_model.bin")
    with pytest.raises(zyphra.ConversionError, match="output_layer.weight differs"):
        zyphra.read_zyphra(tmp_path / "z")


def test_cli_import_export(tmp_path):
    cfg, state = tiny_config(), random_state(tiny_config(), seed=2)
    source = write_checkpoint(tmp_path / "zyphra", cfg, state)
    config = tmp_path / "configs" / "z.yaml"
    assert (
        zyphra.main(
            [
                "import",
                "--zyphra-dir",
                str(source),
                "--out",
                str(tmp_path / "ckpt"),
                "--config-out",
                str(config),
            ]
        )
        == 0
    )
    assert (
        zyphra.main(
            [
                "export",
                "--ckpt",
                str(tmp_path / "ckpt"),
                "--config",
                str(config),
                "--out",
                str(tmp_path / "back"),
                "--dtype",
                "bf16",
            ]
        )
        == 0
    )
    back = torch.load(tmp_path / "back" / "pytorch_model.bin", weights_only=True)["model"]
    for name, tensor in state.items():
        assert back[name].dtype == torch.bfloat16 and torch.equal(
            back[name], tensor.to(torch.bfloat16)
        ), name
    assert (
        zyphra.main(
            ["import", "--zyphra-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]
        )
        == 2
    )
