"""CPU kernels that depend on the instruction set: qforge picks one path, whatever the CPU.

bitsandbytes 0.50 repacks 4-bit weights into an inference-only AVX512-BF16 layout when a CPU forward runs in
eval mode (trainer/quant/bnb.py says what that broke); the default run must end where it ends on an AVX2-only
CPU. On a CPU without AVX512-BF16 the first test cannot fail, and the AVX2 variants are skipped where the
CPU's own kernels already are AVX2 (tests.conftest.cpu_paths); CI on an AVX-512 machine runs all of it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import pytest

from tests.conftest import AVX2_ENV, cpu_paths, native_cpu_capability, only_run_dir, run_cli


def test_bnb4_weights_keep_their_training_layout_through_evaluation() -> None:
    import torch
    from bitsandbytes.nn import Linear4bit

    from trainer.compose import compose
    from trainer.quant.bnb import from_pretrained, quantization_kwargs
    from trainer.tiny import ensure_tiny_model

    cfg = compose(["quant=bnb4"])
    model = from_pretrained(str(ensure_tiny_model(cfg.model.tiny)), quantization_kwargs(cfg, "cpu", "float32"),
                            {"dtype": torch.float32})
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    # The packed bytes, compared as bytes: viewed as float32 some of them are NaN patterns.
    packed = {id(m): m.weight.data.view(torch.uint8).clone() for m in layers}
    ids = torch.tensor([[1, 5, 9, 20, 33, 7, 11, 2]])

    model.eval()
    with torch.no_grad():
        evaluated = model(input_ids=ids).logits
    for layer in layers:  # not repacked into the uint8 [N, K/2] inference layout, absmax untouched
        assert layer.weight.dtype == torch.float32
        assert torch.equal(layer.weight.data.view(torch.uint8), packed[id(layer)])
        assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    model.train()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    assert torch.equal(evaluated, trained)  # one kernel path for evaluation and training
    model.state_dict()  # a checkpoint save: the weights the next step trains on are the same bytes
    assert all(torch.equal(m.weight.data.view(torch.uint8), packed[id(m)]) for m in layers)


_DEFAULT_RUNS: Dict[str, dict] = {}


def default_run_metrics(tmp_root: Path, cpu_env: dict) -> dict:
    key = json.dumps(cpu_env, sort_keys=True)
    if key not in _DEFAULT_RUNS:
        root = tmp_root / f"default-{len(_DEFAULT_RUNS)}"
        result = run_cli(f"output_root={root}", env=cpu_env)
        assert result.returncode == 0, result.stderr[-3000:]
        _DEFAULT_RUNS[key] = json.loads((only_run_dir(root) / "metrics.json").read_text())
    return _DEFAULT_RUNS[key]


@pytest.mark.parametrize("cpu_env", [p for p in cpu_paths() if p.id != "cpu-native"])
def test_the_default_run_ends_where_it_ends_on_avx2(cpu_env: dict, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Same seed, data and versions: the native and the AVX2 kernels end at the same eval loss.

    Kernels sum in other orders, so bits may differ, but 21 steps of a tiny model stay within 0.01; the
    AVX512-BF16 repack (bf16 weights and matmuls, no input gradient through the base layers) moved it by 0.32.
    """
    assert cpu_env == AVX2_ENV
    root = tmp_path_factory.mktemp("cpu-paths")
    native = default_run_metrics(root, {})
    avx2 = default_run_metrics(root, cpu_env)
    assert native["steps"] == avx2["steps"]
    assert abs(native["eval_loss"] - avx2["eval_loss"]) < 0.01, (native_cpu_capability(), native["eval_loss"],
                                                                avx2["eval_loss"])
    assert abs(native["eval_loss_before"] - avx2["eval_loss_before"]) < 1e-3
