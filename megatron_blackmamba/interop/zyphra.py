"""Convert between Zyphra's released BlackMamba checkpoints and this project's checkpoints.

    python -m megatron_blackmamba.interop.zyphra import --zyphra-dir DIR --out CKPT_DIR [--tokenizer
    T.json] [--config-out x.yaml]
    python -m megatron_blackmamba.interop.zyphra export --ckpt CKPT_DIR --out DIR [--config x.yaml]

The imported checkpoint carries its config (and, with ``--tokenizer``, the tokenizer), so export,
generation and evaluation need nothing else; export reads the checkpoint's config unless
``--config`` names another.

Zyphra's layout (github.com/Zyphra/BlackMamba, ``MambaModel.from_pretrained``): ``DIR/config.json``
and ``DIR/pytorch_model.bin`` = ``torch.save({"model": state_dict})`` with megatron-style names:

* ``embedding.word_embeddings.weight``; the output layer is tied to it and not stored;
* per layer ``decoder.layers.{i}.norm.weight`` (pre-norm RMSNorm) and
``decoder.layers.{i}.mixer.*``:
  a Mamba-1 mixer (``in_proj`` rows [x; z], ``conv1d``, ``x_proj``, ``dt_proj`` with bias,
  ``A_log``, ``D``, ``out_proj``) for code ``"r"`` in ``mamba_moe_layers``, or a top-1 switch MoE
  (``router`` = biased Linear, ``local_experts.{e}.linear_fc1/linear_fc2``) for a code ``"N"``;
* ``decoder.final_layernorm.weight/.bias``: a LayerNorm *with bias*, unlike the block RMSNorms.

Zyphra's blocks carry ``residual = hidden + residual`` from one layer to the next and normalise the
sum; that is the same computation as megatron's per-layer ``x + f(norm(x))`` (the carried residual
is exactly megatron's hidden state), so only names and three options differ. The model
represents the released architecture with ``model.final_norm=layernorm``, ``model.router_bias=true``
and, for ``swiglu: true``, a gated expert MLP whose gate function is a choice
(``--glu-activation``):
Zyphra's released code gates with GELU (``MambaConfig.activation_func`` defaults to ``F.gelu``
and ``from_pretrained`` never changes it) although the paper says SwiGLU; ``gelu`` (the default)
reproduces the released code exactly, ``silu`` the paper.

Layout independence: tensors are moved into a single-process (TP=PP=EP=1) model and saved with the
project's sharded checkpoints, which load at any TP/PP/EP layout; export loads into the same
single-process model. Both directions therefore need one process (the CLI is one).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pickle
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import yaml

from megatron_blackmamba.checkpointing import (
    CheckpointError,
    checkpoint_config,
    load_checkpoint,
    save_checkpoint,
)
from megatron_blackmamba.config import (
    ConfigError,
    JobConfig,
    ModelConfig,
    ParallelConfig,
    apply_dict,
    load_config,
)
from megatron_blackmamba.logging_setup import configure_logging
from megatron_blackmamba.model.builder import build_model
from megatron_blackmamba.parallel.setup import destroy, init_distributed

WEIGHTS_FILE = "pytorch_model.bin"
CONFIG_FILE = "config.json"
# Zyphra's config fields that from_pretrained reads (it ignores every other field, so do we).
ZYPHRA_FIELDS = (
    "num_layers",
    "hidden_size",
    "state_size",
    "conv_dimension",
    "vocab_size",
    "expansion_factor",
    "mamba_moe_layers",
    "ffn_hidden_size",
    "add_bias_linear",
    "swiglu",
    "max_sequence_length",
)
# --glu-activation (what Zyphra's ``swiglu: true`` gates with) -> model.activation.
GLU_ACTIVATIONS = {"gelu": "geglu", "silu": "swiglu"}
# Fixed in Zyphra's MambaConfig (not read from config.json).
ZYPHRA_NORM_EPS = 1e-5
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Our name -> Zyphra's name; names not matched here are identical in both layouts.
_RENAMES = (
    (re.compile(r"^decoder\.layers\.(\d+)\.pre_mlp_layernorm\."), r"decoder.layers.\1.norm."),
    (re.compile(r"^decoder\.layers\.(\d+)\.mlp\.router\."), r"decoder.layers.\1.mixer.router."),
    (
        re.compile(r"^decoder\.layers\.(\d+)\.mlp\.experts\.local_experts\."),
        r"decoder.layers.\1.mixer.local_experts.",
    ),
    (re.compile(r"^decoder\.final_norm\."), "decoder.final_layernorm."),
)


class ConversionError(ValueError):
    """The checkpoint or config cannot be converted; the message names the tensor/field and file."""


def zyphra_name(ours: str) -> str:
    for pattern, replacement in _RENAMES:
        if pattern.match(ours):
            return pattern.sub(replacement, ours)
    return ours


# ---------------------------------------------------------------------------------------- configs
def model_fields(zcfg: dict, glu_activation: str = "gelu", source: str = CONFIG_FILE) -> dict:
    """ModelConfig fields reproducing the model Zyphra's ``from_pretrained`` builds from
    ``zcfg``."""
    missing = [name for name in ZYPHRA_FIELDS if name not in zcfg]
    if missing:
        raise ConversionError(
            f"{source}: missing field(s) {missing} (Zyphra's from_pretrained reads"
            f" {list(ZYPHRA_FIELDS)})"
        )
    if zcfg["add_bias_linear"]:
        raise ConversionError(
            f"{source}: add_bias_linear=true puts a bias on Zyphra's output layer"
            " (output_layer.bias), which megatron's MambaModel cannot represent"
        )
    codes = list(zcfg["mamba_moe_layers"]) or ["r"] * zcfg["num_layers"]
    if len(codes) != zcfg["num_layers"]:
        raise ConversionError(
            f"{source}: mamba_moe_layers has {len(codes)} entries, num_layers is"
            f" {zcfg['num_layers']}"
        )
    pattern, experts = "", set()
    for i, code in enumerate(codes):
        if code == "r":
            pattern += "M"
        elif len(code) == 1 and code in "23456789":
            pattern += "E"
            experts.add(int(code))
        else:
            raise ConversionError(
                f"{source}: mamba_moe_layers[{i}]={code!r} is not supported; only 'r' (Mamba block)"
                " and '2'..'9' (top-1 switch MoE block) have an equivalent here (no dense '1' or"
                " parallel 'rN' blocks)"
            )
    if len(experts) > 1:
        raise ConversionError(
            f"{source}: MoE layers with different expert counts {sorted(experts)} are not supported"
        )
    if glu_activation not in GLU_ACTIVATIONS:
        raise ConversionError(
            f"glu_activation={glu_activation!r}: choose one of {sorted(GLU_ACTIVATIONS)}"
        )
    return {
        "num_layers": zcfg["num_layers"],
        "layer_pattern": pattern,
        "hidden_size": zcfg["hidden_size"],
        "d_state": zcfg["state_size"],
        "d_conv": zcfg["conv_dimension"],
        "expand": zcfg["expansion_factor"],
        "dt_rank": 0,  # Zyphra's dt_rank is always "auto" = ceil(hidden_size / 16), like ours
        "vocab_size": zcfg["vocab_size"],
        "num_experts": experts.pop() if experts else ModelConfig().num_experts,
        "moe_topk": 1,
        "ffn_hidden_size": zcfg["ffn_hidden_size"],
        "activation": GLU_ACTIVATIONS[glu_activation] if zcfg["swiglu"] else "gelu",
        "add_bias_linear": False,
        "router_bias": True,
        "routing": "sinkhorn",  # Zyphra's routing_mode default: sigmoid gate, top-1 in inference
        "norm_epsilon": ZYPHRA_NORM_EPS,
        "final_norm": "layernorm",
        "tie_embeddings": True,
        # MambaConfig's default, which the released config.json files leave unset
        "residual_in_fp32": bool(zcfg.get("residual_in_fp32", True)),
        "max_seq_length": zcfg["max_sequence_length"],
    }


def zyphra_config(m: ModelConfig, glu_activation: str = "gelu") -> dict:
    """config.json for ``m``; raises if Zyphra's code would compute something else."""
    gated = GLU_ACTIVATIONS.get(glu_activation)
    problems = []
    if m.final_norm != "layernorm":
        problems.append(
            f"model.final_norm={m.final_norm} (Zyphra's final norm is a LayerNorm with bias)"
        )
    if m.add_bias_linear:
        problems.append("model.add_bias_linear=true (Zyphra's output layer would then need a bias)")
    if not m.tie_embeddings:
        problems.append(
            "model.tie_embeddings=false (Zyphra ties the output layer to the embedding)"
        )
    if m.moe_topk != 1 or m.routing != "sinkhorn":
        problems.append(
            f"model.moe_topk={m.moe_topk}, model.routing={m.routing} (Zyphra: top-1, sigmoid gate)"
        )
    if m.resolved_dt_rank() != math.ceil(m.hidden_size / 16):
        problems.append(f"model.dt_rank={m.dt_rank} (Zyphra's is always ceil(hidden_size / 16))")
    if m.norm_epsilon != ZYPHRA_NORM_EPS:
        problems.append(
            f"model.norm_epsilon={m.norm_epsilon} (Zyphra's is fixed at {ZYPHRA_NORM_EPS})"
        )
    if m.activation not in ("gelu", gated):
        problems.append(
            f"model.activation={m.activation} (with --glu-activation {glu_activation}, Zyphra's "
            f"swiglu=true means {gated}; pass the matching --glu-activation)"
        )
    pattern = m.resolved_layer_pattern()
    if "E" in pattern and not 2 <= m.num_experts <= 9:
        problems.append(f"model.num_experts={m.num_experts} (Zyphra encodes it as one digit 2..9)")
    if problems:
        raise ConversionError(
            "cannot express this model in Zyphra's format: " + "; ".join(problems)
        )
    config = {
        "num_layers": m.num_layers,
        "hidden_size": m.hidden_size,
        "state_size": m.d_state,
        "conv_dimension": m.d_conv,
        "vocab_size": m.vocab_size,
        "expansion_factor": m.expand,
        "mamba_moe_layers": ["r" if c == "M" else str(m.num_experts) for c in pattern],
        "ffn_hidden_size": m.resolved_ffn_hidden_size(),
        "add_bias_linear": False,
        "swiglu": m.activation != "gelu",
        "max_sequence_length": m.max_seq_length,
    }
    if not m.residual_in_fp32:  # MambaConfig defaults to True; the released files leave it unset
        config["residual_in_fp32"] = False
    return config


# ---------------------------------------------------------------------------------------- files
def read_zyphra(
    zyphra_dir: str | Path, trust_pickle: bool = False
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, state dict) of a Zyphra checkpoint directory.

    ``pytorch_model.bin`` is unpickled with ``weights_only=True`` (no code runs) unless
    ``trust_pickle``, for files that also pickle other objects (megatron training checkpoints do).
    """
    zyphra_dir = Path(zyphra_dir)
    config_path, weights_path = zyphra_dir / CONFIG_FILE, zyphra_dir / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ConversionError(
                f"{path} not found: a Zyphra checkpoint directory holds {CONFIG_FILE} and"
                f" {WEIGHTS_FILE}"
            )
    zcfg = json.loads(config_path.read_text())
    try:
        loaded = torch.load(weights_path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        raise ConversionError(
            f"{weights_path} holds more than tensors ({e}); if you trust the file, pass"
            " --trust-pickle"
        ) from e
    # The released files wrap the state dict as {"model": ...}; Zyphra's save_pretrained writes it
    # bare.
    state = (
        loaded["model"]
        if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict)
        else loaded
    )
    if not isinstance(state, dict):
        raise ConversionError(
            f"{weights_path}: expected a state dict or {{'model': state dict}}, got"
            f" {type(state).__name__}"
        )
    return zcfg, _canonical_embedding(dict(state), weights_path)


def _canonical_embedding(state: dict, path: Path) -> dict:
    """Accept save_pretrained's names (``embedding.weight`` + a tied ``output_layer.weight``)."""
    if "embedding.weight" in state and "embedding.word_embeddings.weight" not in state:
        state["embedding.word_embeddings.weight"] = state.pop("embedding.weight")
    output = state.pop("output_layer.weight", None)
    embedding = state.get("embedding.word_embeddings.weight")
    if output is not None and embedding is not None and not torch.equal(output, embedding):
        raise ConversionError(
            f"{path}: output_layer.weight differs from the embedding; only tied output layers are"
            " supported"
        )
    return state


def write_zyphra(out_dir: str | Path, zcfg: dict, state: dict[str, torch.Tensor]) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state}, out_dir / WEIGHTS_FILE)
    (out_dir / CONFIG_FILE).write_text(json.dumps(zcfg, indent=2) + "\n")
    return out_dir


# ---------------------------------------------------------------------------------------- tensors
def _model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights by name (megatron's ``_extra_state`` entries carry none)."""
    return {
        k: v for k, v in model.state_dict(keep_vars=True).items() if not k.endswith("_extra_state")
    }


@torch.no_grad()
def load_zyphra_tensors(
    model: torch.nn.Module, state: dict[str, torch.Tensor], source: str
) -> None:
    """Copy Zyphra-named tensors into a single-process model; every tensor must be used exactly
    once."""
    expected = {zyphra_name(name): tensor for name, tensor in _model_tensors(model).items()}
    missing = [
        f"{name} (expected shape {tuple(t.shape)})"
        for name, t in expected.items()
        if name not in state
    ]
    wrong = [
        f"{name}: expected shape {tuple(t.shape)}, found {tuple(state[name].shape)}"
        for name, t in expected.items()
        if name in state and state[name].shape != t.shape
    ]
    unexpected = sorted(set(state) - set(expected))
    problems = [f"missing tensor {m}" for m in missing] + [f"mismatched tensor {w}" for w in wrong]
    if unexpected:
        problems.append(
            f"unexpected tensors {unexpected} (not part of the model config.json describes)"
        )
    if problems:
        raise ConversionError(f"{source}: " + "; ".join(problems))
    for name, tensor in expected.items():
        tensor.copy_(state[name])


@torch.no_grad()
def zyphra_tensors(
    model: torch.nn.Module, m: ModelConfig, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The model's weights under Zyphra's names; a bias-free router exports as a zero bias
    (exact)."""
    state = {
        zyphra_name(name): t.detach().to(dtype).clone() for name, t in _model_tensors(model).items()
    }
    for i, code in enumerate(m.resolved_layer_pattern()):
        bias = f"decoder.layers.{i}.mixer.router.bias"
        if code == "E" and bias not in state:
            state[bias] = torch.zeros(m.num_experts, dtype=dtype)
    return state


# ---------------------------------------------------------------------------------------- commands
def _single_process_model(job: JobConfig) -> torch.nn.Module:
    """The TP=PP=EP=1 fp32 model conversions go through (fp32 holds bf16/fp16 values exactly)."""
    job.parallel = ParallelConfig()
    job.training.precision = "fp32"
    init_distributed(job.parallel, job.training.seed)
    if dist.get_world_size() != 1:
        raise RuntimeError(
            "checkpoint conversion runs in one process; the result loads at any layout"
        )
    return build_model(job)


def import_zyphra(
    zyphra_dir: str | Path,
    out: str | Path,
    config_out: Optional[str | Path] = None,
    glu_activation: str = "gelu",
    trust_pickle: bool = False,
    tokenizer: Optional[str | Path] = None,
) -> Path:
    """Zyphra checkpoint -> project checkpoint (``out/iter_0000000``, model only); returns its
    path."""
    zyphra_dir = Path(zyphra_dir)
    zcfg, state = read_zyphra(zyphra_dir, trust_pickle)
    source = str(zyphra_dir / CONFIG_FILE)
    job = apply_dict(
        load_config(None), {"model": model_fields(zcfg, glu_activation, source)}, source
    )
    job.training.seq_length = job.model.max_seq_length
    model = _single_process_model(job)
    load_zyphra_tensors(model, state, str(zyphra_dir / WEIGHTS_FILE))
    if config_out is not None:
        config_out = Path(config_out)
        config_out.parent.mkdir(parents=True, exist_ok=True)
        header = (
            f"# Model of Zyphra's BlackMamba checkpoint {zyphra_dir} (glu activation:"
            f" {glu_activation}).\n"
        )
        sections = {
            "model": dataclasses.asdict(job.model),
            "training": {"seq_length": job.training.seq_length},
        }
        config_out.write_text(header + yaml.safe_dump(sections, sort_keys=False))
    if tokenizer is not None:
        job.data.tokenizer = str(Path(tokenizer).resolve())
    return save_checkpoint(out, 0, [model], job=job, tokenizer=tokenizer)


def export_zyphra(
    ckpt: str | Path,
    config: Optional[str | Path],
    out: str | Path,
    glu_activation: str = "gelu",
    dtype: str = "fp32",
) -> Path:
    """Project checkpoint (any layout it was saved at) -> Zyphra checkpoint directory ``out``;
    the model is built from ``config``, else from the checkpoint's own config."""
    job = load_config(config) if config is not None else checkpoint_config(ckpt)
    zcfg = zyphra_config(job.model, glu_activation)
    model = _single_process_model(job)
    load_checkpoint(ckpt, [model])
    return write_zyphra(out, zcfg, zyphra_tensors(model, job.model, DTYPES[dtype]))


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    glu_help = (
        "what Zyphra's swiglu=true gates with: gelu (their released code, default) or silu (the"
        " paper)"
    )
    imp = commands.add_parser("import", help="Zyphra checkpoint -> project checkpoint")
    imp.add_argument(
        "--zyphra-dir", required=True, help=f"directory with {CONFIG_FILE} and {WEIGHTS_FILE}"
    )
    imp.add_argument(
        "--out", required=True, help="checkpoint directory to write (iter_0000000 + latest)"
    )
    imp.add_argument("--config-out", help="also write the model's YAML config here")
    imp.add_argument(
        "--tokenizer",
        help="tokenizer.json to store in the checkpoint (GPT-NeoX-20B's for the released models)",
    )
    imp.add_argument(
        "--glu-activation", choices=sorted(GLU_ACTIVATIONS), default="gelu", help=glu_help
    )
    imp.add_argument(
        "--trust-pickle",
        action="store_true",
        help=f"unpickle {WEIGHTS_FILE} fully (runs code in it)",
    )
    exp = commands.add_parser("export", help="project checkpoint -> Zyphra checkpoint")
    exp.add_argument("--ckpt", required=True, help="checkpoint directory (or one iter_* inside it)")
    exp.add_argument(
        "--config",
        help="YAML config of the checkpoint's model (default: the checkpoint's config.yaml)",
    )
    exp.add_argument(
        "--out", required=True, help=f"directory to write {CONFIG_FILE} and {WEIGHTS_FILE} into"
    )
    exp.add_argument(
        "--glu-activation", choices=sorted(GLU_ACTIVATIONS), default="gelu", help=glu_help
    )
    exp.add_argument(
        "--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the written tensors"
    )
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    configure_logging(verbose=False)
    try:
        if args.command == "import":
            path = import_zyphra(
                args.zyphra_dir,
                args.out,
                args.config_out,
                args.glu_activation,
                args.trust_pickle,
                args.tokenizer,
            )
        else:
            path = export_zyphra(args.ckpt, args.config, args.out, args.glu_activation, args.dtype)
    except (ConversionError, CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        destroy()
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
