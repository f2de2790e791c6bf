"""Every quantization backend loads and LoRA-trains for real on CPU, or stops in preflight with the
line that installs what it needs. Checkpoints are made here from the tiny model (tests/quant)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import cpu_paths, only_run_dir, run_cli

SMALL = ["train.max_steps=2", "do_eval=false", "data.max_samples=24", "train.max_seq_len=96",
         "train.logging_steps=1", "train.save_steps=100"]
PROJ = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def tiny2() -> Path:
    """The tiny Llama with 2 decoder layers (the checkpoints below are made from it)."""
    from trainer.schema import TinyArch
    from trainer.tiny import ensure_tiny_model

    return ensure_tiny_model(TinyArch(num_hidden_layers=2))


def trained_adapter(output_root: Path, result) -> dict:
    """Assert the run trained, and that every projection's LoRA B moved off its zero init:
    gradients flowed through the quantized base layers into the adapters."""
    from safetensors.torch import load_file

    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(output_root)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 2 and math.isfinite(metrics["train_loss"]), metrics
    weights = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    moved = {name.split(".")[-3] for name, w in weights.items() if "lora_B" in name and w.abs().sum() > 0}
    assert moved == PROJ, f"LoRA B stayed zero for {PROJ - moved}"
    return metrics


def train(output_root: Path, *overrides: str, env: dict | None = None) -> dict:
    return trained_adapter(output_root, run_cli(*overrides, *SMALL, f"output_root={output_root}", env=env))


@pytest.mark.parametrize("bits, peft", [(4, "lora"), (2, "dora")])
def test_hqq_quantizes_after_loading_and_trains(bits: int, peft: str, output_root: Path) -> None:
    result = run_cli("quant=hqq", f"quant.bits={bits}", f"peft={peft}", "model.tiny.num_hidden_layers=2",
                     *SMALL, f"output_root={output_root}")
    trained_adapter(output_root, result)
    assert f"hqq: {bits}-bit, group size 64, on cpu" in result.stderr


def test_hqq_replaces_every_decoder_linear(tiny2: Path) -> None:
    import torch
    from hqq.core.quantize import HQQLinear

    from trainer.quant.hqq_apply import load_and_quantize

    model = load_and_quantize(str(tiny2), 4, 64, {"dtype": torch.float32})
    assert len([m for m in model.model.layers.modules() if isinstance(m, HQQLinear)]) == 2 * len(PROJ)
    assert not any(type(m) is torch.nn.Linear for m in model.model.layers.modules())
    assert type(model.lm_head) is torch.nn.Linear  # like bnb, the output layer stays in full precision
    assert set(model.qforge_linear_targets) == PROJ


def test_hqq_reconstruction_error_grows_as_bits_fall() -> None:
    import torch
    from hqq.core.quantize import HQQLinear

    from trainer.quant.hqq_apply import quant_config

    torch.manual_seed(0)
    errors = {}
    for bits in (8, 4, 3, 2, 1):
        linear = torch.nn.Linear(256, 128, bias=False)
        reference = linear.weight.detach().clone()
        layer = HQQLinear(linear, quant_config(bits, 64), compute_dtype=torch.float32, device="cpu")
        errors[bits] = ((layer.dequantize() - reference).norm() / reference.norm()).item()
    assert errors[8] < 0.01 < errors[4] < errors[3] < errors[2] < errors[1] < 1.0, errors


def test_eetq_stops_in_preflight_with_the_install_line(output_root: Path) -> None:
    result = run_cli("quant=eetq", f"output_root={output_root}")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert "needs the package eetq" in errors[0]
    assert "pip install git+https://github.com/NetEase-FuXi/EETQ.git" in errors[0]
    assert "Traceback" not in result.stderr


def test_fp8_checkpoint_is_dequantized_on_load_and_trains(tiny2: Path, tmp_path: Path,
                                                          output_root: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from tests.quant.checkpoints import write_fp8_checkpoint
    from trainer.quant.ptq import load_fp8

    ckpt = write_fp8_checkpoint(tiny2, tmp_path / "fp8")
    model = load_fp8(str(ckpt), None, {"dtype": torch.float32})
    layer = model.model.layers[1].self_attn.o_proj
    assert type(layer) is torch.nn.Linear and layer.weight.dtype == torch.float32
    ref = AutoModelForCausalLM.from_pretrained(tiny2, dtype=torch.float32).model.layers[1].self_attn.o_proj.weight
    assert 0 < ((layer.weight - ref).norm() / ref.norm()).item() < 0.05  # e4m3 rounding, nothing worse
    train(output_root, "quant=fp8", "model=local", f"model.name_or_path={ckpt}")


def test_mxfp4_checkpoint_is_dequantized_on_load_and_trains(tmp_path: Path, output_root: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from tests.quant.checkpoints import write_mxfp4_checkpoint
    from trainer.quant.ptq import load_mxfp4

    source, ckpt = write_mxfp4_checkpoint(tmp_path / "gpt-oss")  # a tiny gpt-oss: MXFP4 covers its experts
    experts = load_mxfp4(str(ckpt), None, {"dtype": torch.float32}).model.layers[0].mlp.experts
    ref = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).model.layers[0].mlp.experts
    assert experts.gate_up_proj.is_floating_point() and experts.gate_up_proj.shape == ref.gate_up_proj.shape
    error = ((experts.gate_up_proj.float() - ref.gate_up_proj).norm() / ref.gate_up_proj.norm()).item()
    assert 0.02 < error < 0.2, error  # e2m1 with a shared power-of-two scale per 32 weights
    # gpt-oss has no SDPA attention in transformers, hence eager.
    result = run_cli("quant=mxfp4", "model=local", f"model.name_or_path={ckpt}", "model.attn_implementation=eager",
                     *SMALL, f"output_root={output_root}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((only_run_dir(output_root) / "metrics.json").read_text())
    assert metrics["steps"] == 2 and math.isfinite(metrics["train_loss"]), metrics


def test_aqlm_checkpoint_loads_and_trains(tiny2: Path, tmp_path: Path, output_root: Path) -> None:
    pytest.importorskip("aqlm", reason="pip install 'qforge[aqlm]'")
    from tests.quant.checkpoints import write_aqlm_checkpoint

    ckpt = write_aqlm_checkpoint(tiny2, tmp_path / "aqlm")  # 4 codebooks x 4 bits / 8 weights = 2 bits
    train(output_root, "quant=aqlm", "quant.bits=2", "model=local", f"model.name_or_path={ckpt}")


@pytest.mark.parametrize("cpu_env", cpu_paths())
def test_awq_checkpoint_loads_and_trains(cpu_env: dict, tiny2: Path, tmp_path: Path, output_root: Path) -> None:
    pytest.importorskip("gptqmodel", reason="pip install 'qforge[awq]'")
    from tests.quant.checkpoints import write_awq_checkpoint

    ckpt = write_awq_checkpoint(tiny2, tmp_path / "awq")
    result = run_cli("quant=awq", "model=local", f"model.name_or_path={ckpt}", *SMALL,
                     f"output_root={output_root}", env=cpu_env)
    trained_adapter(output_root, result)
    # Named by qforge, not left to gptqmodel, whose own pick on AVX512-BF16 CPUs is an inference-only kernel.
    assert "quantized layers: AwqTorchLinear" in result.stderr


def test_gptq_refuses_a_16bit_model_in_one_sentence(tiny2: Path, output_root: Path) -> None:
    pytest.importorskip("gptqmodel")
    result = run_cli("quant=gptq", "model=local", f"model.name_or_path={tiny2}", *SMALL,
                     f"output_root={output_root}")
    assert result.returncode != 0
    assert "quant=gptq needs a pre-quantized GPTQ checkpoint, but" in result.stderr, result.stderr[-2000:]
    assert "python -m trainer.export makes GPTQ ones" in result.stderr and "Traceback" not in result.stderr


def test_prequantized_checks_method_and_bits_before_loading(tmp_path: Path) -> None:
    from trainer.errors import UserError
    from trainer.quant.aqlm import checkpoint_bits
    from trainer.quant.prequantized import check_checkpoint

    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "aqlm", "in_group_size": 8, "out_group_size": 1, "num_codebooks": 1,
        "nbits_per_codebook": 16}}))
    check_checkpoint(str(tmp_path), "aqlm", 2, bits_of=lambda q: round(checkpoint_bits(q)))
    with pytest.raises(UserError, match=r"is a 2-bit AQLM checkpoint, but quant.bits=3; set quant.bits=2"):
        check_checkpoint(str(tmp_path), "aqlm", 3, bits_of=lambda q: round(checkpoint_bits(q)))
    with pytest.raises(UserError, match=r"quant=awq needs a pre-quantized AWQ checkpoint, but .* is quantized "
                                        r"with aqlm; .* or use quant=aqlm"):
        check_checkpoint(str(tmp_path), "awq", 4)


def test_an_installed_gpu_only_package_stops_a_cpu_run_in_one_sentence() -> None:
    import torch

    from trainer.errors import UserError
    from trainer.preflight import check_requirements
    from trainer.quant import Requirement

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    needs_gpu = Requirement("torch", "torch", None, "pip install torch", needs_gpu=True)
    with pytest.raises(UserError, match=r"^quant=x runs only on an NVIDIA GPU \(torch has no CPU kernels\) and none "
                                        r"is visible here; run this config on a GPU machine\.$"):
        check_requirements([("quant=x", needs_gpu)])
    with pytest.raises(UserError, match=r"needs the package nope, which is not installed; install it with: pip x"):
        check_requirements([("quant=x", Requirement("nope_missing_module", "nope", None, "pip x"))])
