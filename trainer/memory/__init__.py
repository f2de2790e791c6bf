"""Will it fit? Each GPU's peak memory for a composition, predicted before launch and without torch.

    python -m trainer.memory model=llama3_8b quant=bnb4 train.max_seq_len=8192     # the breakdown
    python -m trainer.memory --sweep train.max_seq_len=2048,8192,16384 train.batch_size=1,4 [--png out.png]

`predict(cfg)` is a pure function of the composed config and the model's config.json (a local directory's,
the local Hugging Face cache's, or the copy shipped for each preset in trainer/assets/model_configs/; the
embedded tiny model's from model.tiny). No weight is read. It returns a `Prediction`: a breakdown by term
(base weights by backend and bits, embeddings and lm_head, adapter parameters, their gradients and optimizer
state, activations kept for backward per layer by checkpointing policy, logits and loss, dequantization and
backward temporaries, sharding by strategy and world size) and the peak per GPU, which is the largest of the
phases a step goes through: loading, the end of the forward pass (loss), the backward pass of the last
layer (or the recompute of a checkpointed one), the optimizer step and evaluation.

How the activation terms are derived: for every op of a Llama-style decoder layer, what autograd keeps for
backward in this code base (SDPA keeps q, k, v, out and the logsumexp; liger's SwiGLU keeps gate and up; HF
RMSNorm keeps an fp32 copy of its input, liger's keeps the input; peft's LoRA keeps a bool dropout mask and
the dropped input per adapted layer, the fused branch (trainer/lora_fused.py) only the rank-r products; bnb
4-bit and plain frozen linears keep nothing, HQQ keeps its input, bnb 8-bit keeps its input as a ctx attribute,
which activation checkpointing cannot drop). Each storage is counted once. The sum reproduces the
bench/RESULTS.md measurements of runs 1-4 within 2% on the liger path (tests/test_memory.py checks them).

What is measured rather than derived lives in CALIBRATION below, in one place (docs/memory.md says how the
GPU benchmark, bench/memory_bench.py, refits it). The validator's rules at the bottom refuse a composition
whose predicted peak exceeds the target GPU's memory, warn within 10%, and `train.checkpoint_layers=auto`
is resolved here (the plan shows the number).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from trainer.memory.shapes import ModelShape, find_shape, shape_from_config
from trainer.strategies import ALL as _STRATEGIES

GIB = 2**30


# ---- calibration: the only constants fitted to measurements (see docs/memory.md) ----------------------

@dataclass(frozen=True)
class Calibration:
    """Constants fitted to measurements; every other number in this module is derived from shapes and dtypes.

    allocator_overhead: the caching allocator reserves more than it hands out (fragmentation, rounding);
        `needed = peak_allocated * (1 + allocator_overhead) + cuda_context`. Fit: max_memory_reserved /
        max_memory_allocated - 1 over the benchmark's cells.
    cuda_context_gib: the CUDA context, cuBLAS/cuDNN handles and kernel images; not in
        torch.cuda.max_memory_allocated, but taken from the GPU's total.
    activations / transients: multipliers on the derived kept activations and on the temporaries of a phase
        (1.0 = as derived). fixed_gib: a constant every cell showed beyond the derived terms.
    """

    allocator_overhead: float = 0.05
    cuda_context_gib: float = 0.5
    activations: float = 1.0
    transients: float = 1.0
    fixed_gib: float = 0.0
    # Which measurement these numbers come from; docs/memory.md records the table.
    source: str = ("derived only: allocator_overhead and cuda_context_gib are typical values, not yet fitted "
                   "(the GPU table in docs/memory.md is pending)")


CALIBRATION = Calibration()

# Within this fraction of the GPU's memory the rule warns; train.checkpoint_layers=auto keeps this margin.
MARGIN = 0.10
# Same threshold as trainer.lora_fused.MIN_TOKENS_X_HIDDEN (that module imports torch; a test checks they agree).
FUSED_LORA_MIN_WORK = int(os.environ.get("QFORGE_FUSED_LORA_MIN_WORK", 2**25))
# DeepSpeed's default stage3_max_live_parameters (elements); trainer.strategies.deepspeed_config leaves it.
ZERO3_MAX_LIVE_PARAMETERS = 1e9
# trainer.fused_loss.CHUNK_ELEMENTS: fp32 logits elements per chunk of the torch chunked loss.
TORCH_CE_CHUNK_ELEMENTS = 1 << 27
# trainer.speed.LIGER_MODEL_TYPES / NO_FUSED_LORA_STRATEGIES, repeated here to keep this module import-light.
LIGER_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "mixtral")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# bnb 8-bit: the share of down_proj's input columns holding a value over LLM.int8's outlier threshold (6.0),
# assumed for a pretrained model: SmolLM2-135M-Instruct on the shipped data has 4.1% on average over its layers
# (37.8% in the worst one) and 0.3% or less in every other linear's input (python -m bench.int8_outliers).
# Those columns are kept a second time for backward (subA on MatMul8bitLt's ctx); a random-weight checkpoint
# can have all of them, which is why the bench measures its own share.
INT8_OUTLIER_SHARE = 0.05
# The strategies' own facts (trainer/strategies/): which shard weights, which the fused LoRA branch and the
# chunked loss cannot use.
SHARDED_STRATEGIES = tuple(s.name for s in _STRATEGIES if s.shards_weights)
NO_FUSED_LORA_STRATEGIES = tuple(s.name for s in _STRATEGIES if not s.allows_fused_lora)
NO_FUSED_CE_STRATEGIES = tuple(s.name for s in _STRATEGIES if not s.allows_fused_ce)



# ---- what the prediction needs from a composed config ---------------------------------------------------

@dataclass(frozen=True)
class Inputs:
    """Everything predict() reads from a composed config, as plain values (fixes are tried on copies)."""

    shape: Optional[ModelShape]
    shape_source: str
    device: str  # "cuda" or "cpu": where the run's memory is predicted
    dtype: str
    world: int
    strategy: str
    offload_params: bool
    offload_optimizer: bool
    method: str
    bits: Optional[int]
    double_quant: bool
    group_size: int
    peft: str
    r: int
    dropout: float
    targets: Tuple[str, ...]
    oft_block_size: int
    freeze_layers: int
    batch: int
    eval_batch: int
    seq: int
    grad_accum: int
    do_train: bool
    do_eval: bool
    gradient_checkpointing: bool
    checkpoint_layers: Any  # None, an int, or "auto" (anything else was refused by a rule; read as None)
    packing: bool
    packed_rows: bool  # packed rows may hold several examples: SDPA then gets a block-diagonal mask
    fused_ce: bool
    fused_lora: Optional[bool]
    liger: bool
    liger_auto: bool  # model.liger=null: liger's kernels where CUDA and liger-kernel are there
    upcast_layernorm: bool
    attn: str
    optim: str
    device_map_auto: bool
    target_gib: Optional[float]
    target_source: str
    # bnb 8-bit: the share of down_proj's input columns over LLM.int8's outlier threshold, which bitsandbytes
    # keeps a second time for backward. A property of the weights and data, not of the config: the default is a
    # pretrained model's (INT8_OUTLIER_SHARE); bench/memory_bench.py passes what it measured on its checkpoint.
    int8_outlier_share: float = INT8_OUTLIER_SHARE
    offload_activations: bool = False  # train.offload_activations: what the layers save goes to host memory
    # train.offload_activations=null: on by default where it applies (_with_default_offload), decided with the shape
    offload_auto: bool = False
    compile: bool = False  # train.compile: peft's LoRA forward, never the fused branch
    # Pinned host bytes one process may take under offload (HOST_SHARE of the node's memory over its processes,
    # whole GiB so that one plan sees one figure), or None where the node's memory is not known.
    host_budget: Optional[float] = None
    # train.offload_layers under offload: how many un-checkpointed layers move all they save to the host (None:
    # all of them); the others keep it on the GPU. Decided here with checkpoint_layers=auto.
    offload_layers: Optional[int] = None
    # train.embeddings_on_host (null: wherever it applies, trainer/host_embeddings.py) and what it depends on.
    embeddings_on_host: Optional[bool] = False
    resize_vocab: bool = False


def _value(x: Any) -> Any:
    return x.value if isinstance(x, Enum) else x


def _int(x: Any, default: int) -> int:
    try:
        return int(x)
    except (TypeError, ValueError):
        return default


def target_memory(cfg: Any, gpus_mem_gib: Sequence[float] = ()) -> Tuple[Optional[float], str]:
    """The GPU memory a run is checked against: by hand, the Slurm profile's, or this machine's GPUs."""
    by_hand = cfg.train.gpu_mem_gib
    if by_hand is not None:
        return float(by_hand), "train.gpu_mem_gib"
    if _value(cfg.launcher.name) == "slurm":
        slurm = cfg.launcher.slurm
        if slurm.gpu_mem_gib is not None and _int(slurm.gpu_mem_gib, 0) >= 0 and slurm.gpus_per_node > 0:
            return float(slurm.gpu_mem_gib), "launcher.slurm.gpu_mem_gib"
        return None, "none: a Slurm job's GPUs are not this machine's; set launcher.slurm.gpu_mem_gib"
    if gpus_mem_gib:
        return float(min(gpus_mem_gib)), f"detected: the smallest of this machine's {len(gpus_mem_gib)} GPU(s)"
    return None, "none: no GPU here and train.gpu_mem_gib is not set"


def inputs_from_cfg(cfg: Any, device: Optional[str] = None, packed_rows: Optional[bool] = None) -> Inputs:
    from trainer.env import accelerators
    from trainer.layout import nproc_per_node, resolve_compute_dtype

    acc = accelerators()
    launcher = _value(cfg.launcher.name)
    target, target_source = target_memory(cfg, acc.memory_gib)
    slurm_gpus = cfg.launcher.slurm.gpus_per_node if launcher == "slurm" else 0
    if device is None:
        # A GPU run is predicted wherever a GPU memory is known or visible; the plan's own dtype on a CPU
        # login node is float32, but the run a target memory describes computes on the GPU.
        device = "cuda" if target is not None or acc.gpus > 0 or slurm_gpus > 0 else "cpu"
    gpus = 1 if device == "cuda" else 0
    dtype = resolve_compute_dtype(cfg, gpus, acc.bf16 if acc.gpus else True)
    if launcher == "local":
        world = 1
    elif launcher == "slurm":
        world = max(cfg.launcher.slurm.nodes, 1) * max(slurm_gpus, 1)
    else:
        try:
            world = nproc_per_node(cfg, acc.gpus) * max(cfg.launcher.nnodes, 1)
        except (TypeError, ValueError):
            world = 1  # the launcher.nproc_per_node rule refuses the value
    train, peft, quant, model = cfg.train, cfg.peft, cfg.quant, cfg.model
    strategy = str(_value(cfg.strategy.name))
    method = str(_value(quant.method))
    liger = model.liger
    if liger is None:
        liger = importlib.util.find_spec("liger_kernel") is not None
    liger = bool(liger) and device == "cuda"  # liger's kernels are Triton: CUDA only (trainer.speed.use_liger)
    checkpoint_layers = train.checkpoint_layers
    if not (checkpoint_layers is None or checkpoint_layers == "auto" or valid_checkpoint_layers(checkpoint_layers)):
        checkpoint_layers = None
    return Inputs(
        shape=None, shape_source="",  # filled by predict() (find_shape reads files; cached there)
        device=device, dtype=dtype, world=max(int(world), 1), strategy=strategy,
        offload_params=bool(cfg.strategy.offload_params) or strategy == "zero3_offload",
        offload_optimizer=bool(cfg.strategy.offload_optimizer) or strategy == "zero3_offload",
        method=method, bits=quant.bits, double_quant=bool(quant.double_quant), group_size=_int(quant.group_size, 64),
        peft=str(_value(peft.method)), r=max(_int(peft.r, 0), 0), dropout=float(peft.dropout),
        targets=tuple(str(t) for t in peft.target_modules), oft_block_size=max(_int(peft.oft_block_size, 0), 0),
        freeze_layers=max(_int(peft.freeze_trainable_layers, 0), 0),
        batch=max(_int(train.batch_size, 1), 1), eval_batch=max(_int(train.eval_batch_size, 1), 1),
        seq=max(_int(train.max_seq_len, 1), 1), grad_accum=max(_int(train.grad_accum, 1), 1),
        do_train=bool(cfg.do_train), do_eval=bool(cfg.do_eval),
        gradient_checkpointing=bool(train.gradient_checkpointing), checkpoint_layers=checkpoint_layers,
        packing=bool(train.packing), packed_rows=bool(train.packing) if packed_rows is None else packed_rows,
        fused_ce=bool(train.fused_ce), fused_lora=train.fused_lora, liger=bool(liger), liger_auto=model.liger is None,
        upcast_layernorm=bool(model.upcast_layernorm), attn=str(model.attn_implementation), optim=str(train.optim),
        device_map_auto=model.device_map is not None,
        target_gib=target, target_source=target_source,
        offload_activations=bool(train.offload_activations) and device == "cuda",
        offload_auto=train.offload_activations is None and device == "cuda",
        offload_layers=_offload_layers(train) if train.offload_activations and device == "cuda" else None,
        host_budget=_host_budget(cfg) if train.offload_activations is not False and device == "cuda" else None,
        compile=bool(train.compile),
        embeddings_on_host=train.embeddings_on_host, resize_vocab=bool(model.resize_vocab),
    )


def _host_budget(cfg: Any) -> Optional[float]:
    from trainer.memory.host import HOST_SHARE, host_target, ranks_per_node

    target, _ = host_target(cfg)
    return None if target is None else math.floor(HOST_SHARE * target / ranks_per_node(cfg)) * GIB


def _offload_layers(train: Any) -> Optional[int]:
    value = train.offload_layers
    return value if valid_offload_layers(value) else None


def valid_offload_layers(value: Any) -> bool:
    """null (every un-checkpointed layer) or a non-negative number of layers."""
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)


def valid_checkpoint_layers(value: Any) -> bool:
    """null (every layer), a non-negative number of layers, or "auto"."""
    if value is None or value == "auto":
        return True
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# ---- the prediction --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Term:
    name: str
    bytes: float
    note: str = ""

    @property
    def gib(self) -> float:
        return self.bytes / GIB


@dataclass
class Phase:
    name: str
    terms: List[Term]
    # Loading happens before the optimizer state and adapters exist: its terms are the whole figure.
    standalone: bool = False

    @property
    def bytes(self) -> float:
        return sum(t.bytes for t in self.terms)


@dataclass
class Prediction:
    known: bool
    reason: str = ""
    shape_source: str = ""
    shape: str = ""
    device: str = "cpu"
    dtype: str = "float32"
    world: int = 1
    strategy: str = "single"
    tokens: int = 0
    layers: int = 0
    checkpointed: int = 0
    checkpoint_layers: Any = None  # resolved: None = every layer, else the first N layers
    offload_layers: Optional[int] = None  # resolved, under offload: un-checkpointed layers offloaded whole
    auto: str = ""
    static: List[Term] = field(default_factory=list)
    phases: List[Phase] = field(default_factory=list)
    target_gib: Optional[float] = None
    target_source: str = ""
    assumptions: List[str] = field(default_factory=list)
    calibration: Calibration = CALIBRATION
    host_bytes: float = 0.0  # pinned host memory per GPU of train.offload_activations (trainer/memory/host.py)
    embeddings_on_host: bool = False  # train.embeddings_on_host as resolved for this run (trainer/host_embeddings)
    offload_activations: bool = False  # train.offload_activations as resolved for this run
    offload_by_default: bool = False  # ... turned on by its null default (_with_default_offload)

    @property
    def static_bytes(self) -> float:
        return sum(t.bytes for t in self.static)

    def total(self, phase: Phase) -> float:
        """Allocated bytes at a phase: the static terms and the phase's own (a standalone phase's alone)."""
        return phase.bytes + (0.0 if phase.standalone else self.static_bytes) + self.calibration.fixed_gib * GIB

    @property
    def peak_phase(self) -> Optional[Phase]:
        return max(self.phases, key=self.total) if self.phases else None

    def phase_bytes(self, name: str) -> float:
        """Allocated bytes at the named phase (0 when the run has no such phase)."""
        return next((self.total(p) for p in self.phases if p.name == name), 0.0)

    @property
    def peak_bytes(self) -> float:
        """What torch.cuda.max_memory_allocated should read at the worst moment of the run."""
        phase = self.peak_phase
        return self.total(phase) if phase else self.static_bytes

    @property
    def train_peak_bytes(self) -> float:
        """The peak over training steps only (what a run's metrics.json peak_memory_bytes measures)."""
        return max((self.total(p) for p in self.phases if p.name in TRAIN_PHASES), default=self.static_bytes)

    @property
    def needed_bytes(self) -> float:
        """GPU memory the run needs: the allocated peak, the allocator's overhead and the CUDA context."""
        cal = self.calibration
        return self.peak_bytes * (1 + cal.allocator_overhead) + cal.cuda_context_gib * GIB

    def breakdown(self) -> List[Term]:
        """The terms present at the peak: static ones, then the peak phase's."""
        phase = self.peak_phase
        terms = list(phase.terms) if phase is not None and phase.standalone else \
            [*self.static, *(phase.terms if phase else [])]
        return [t for t in terms if t.bytes > 0]

    def largest(self, n: int = 3) -> List[Term]:
        merged: Dict[str, float] = {}
        for term in self.breakdown():
            merged[term.name] = merged.get(term.name, 0.0) + term.bytes
        return [Term(k, v) for k, v in sorted(merged.items(), key=lambda kv: -kv[1])[:n]]

    @property
    def fits(self) -> Optional[bool]:
        if not self.known or self.target_gib is None:
            return None
        return self.needed_bytes <= self.target_gib * GIB

    @property
    def tight(self) -> bool:
        return bool(self.fits) and self.needed_bytes > (1 - MARGIN) * self.target_gib * GIB

    def verdict(self) -> str:
        if not self.known:
            return f"not predicted: {self.reason}"
        if self.target_gib is None:
            return f"not compared with any GPU memory ({self.target_source})"
        share = self.needed_bytes / (self.target_gib * GIB)
        state = "does NOT fit" if not self.fits else ("fits, within 10%" if self.tight else "fits")
        return f"{state}: needs {_g(self.needed_bytes)} of {self.target_gib:g} GiB ({share:.0%}, {self.target_source})"

    def to_dict(self) -> Dict[str, Any]:
        """Plain values for plan.json and the printed plan."""
        if not self.known:
            return {"predicted": False, "reason": self.reason, "gpu_memory_gib": self.target_gib,
                    "compared_with": self.target_source}
        phase = self.peak_phase
        cal = self.calibration
        return {
            "model": self.shape_source,
            "shape": self.shape,
            "device": self.device,
            "dtype": self.dtype,
            "per_gpu_of": self.world,
            "strategy": self.strategy,
            "tokens_per_micro_batch": self.tokens,
            "checkpointed_layers": f"{self.checkpointed} of {self.layers}",
            **({"offloaded_layers": f"{self.offload_layers} of {self.layers}"}
               if self.offload_layers is not None else {}),
            **({"checkpoint_layers_auto": self.auto} if self.auto else {}),
            **({"activation_offload": f"on by default (train.offload_activations=null): {self.offload_layers} "
                                      f"layers offload all they save, {self.checkpointed} are checkpointed with "
                                      "their input offloaded"} if self.offload_by_default else {}),
            "breakdown_gib": {t.name: round(t.gib, 3) for t in self.breakdown()},
            "peak_phase": phase.name if phase else "",
            "phases_gib": {p.name: round(self.total(p) / GIB, 3) for p in self.phases},
            "peak_allocated_gib": round(self.peak_bytes / GIB, 3),
            "allocator_overhead": cal.allocator_overhead,
            "cuda_context_gib": cal.cuda_context_gib,
            "needed_per_gpu_gib": round(self.needed_bytes / GIB, 3),
            **({"pinned_host_per_gpu_gib": round(self.host_bytes / GIB, 3)} if self.host_bytes else {}),
            "gpu_memory_gib": self.target_gib,
            "compared_with": self.target_source,
            "verdict": self.verdict(),
            "calibration": cal.source,
            "assumptions": list(self.assumptions),
        }


TRAIN_PHASES = ("forward end (loss)", "backward", "optimizer step")


def _g(nbytes: float) -> str:
    return f"{nbytes / GIB:.1f} GiB"


def predict(cfg: Any, device: Optional[str] = None, packed_rows: Optional[bool] = None,
            int8_outlier_share: Optional[float] = None) -> Prediction:
    """Per-GPU peak memory of a composed config; never raises for a composition the schema accepts.

    device: "cuda" or "cpu" to predict for, instead of what this machine and the target memory suggest.
    packed_rows: False when every packed row holds one example (no block-diagonal attention mask); the
    default (train.packing) assumes the worst case, several examples per row.
    int8_outlier_share: for bnb 8-bit, the measured share of down_proj input columns over LLM.int8's outlier
    threshold, instead of INT8_OUTLIER_SHARE (a pretrained model's).
    """
    return predict_with_inputs(cfg, device, packed_rows, int8_outlier_share)[0]


def predict_with_inputs(cfg: Any, device: Optional[str] = None, packed_rows: Optional[bool] = None,
                        int8_outlier_share: Optional[float] = None) -> Tuple[Prediction, Optional[Inputs]]:
    try:
        x = inputs_from_cfg(cfg, device=device, packed_rows=packed_rows)
        if int8_outlier_share is not None:
            x = dataclasses.replace(x, int8_outlier_share=float(int8_outlier_share))
        shape, source = find_shape(cfg)
        # liger patches only the model types it has kernels for (trainer.speed.LIGER_MODEL_TYPES).
        liger = x.liger and shape is not None and shape.model_type in LIGER_MODEL_TYPES
        x = dataclasses.replace(x, shape=shape, shape_source=source, liger=liger)
        x = _with_default_offload(x)
        return predict_inputs(x), x
    except Exception as err:  # noqa: BLE001  (a validator must never crash; tests assert this never happens)
        return Prediction(known=False, reason=f"internal error in trainer.memory: {type(err).__name__}: {err}"), None


@functools.lru_cache(maxsize=1024)
def predict_inputs(x: Inputs) -> Prediction:
    """The prediction for resolved inputs, with train.checkpoint_layers=auto decided here."""
    if x.shape is None:
        return Prediction(known=False, reason=x.shape_source, target_gib=x.target_gib, target_source=x.target_source)
    layers = x.shape.layers
    if not (x.do_train and x.gradient_checkpointing):
        return _predict(x, 0, x.checkpoint_layers if x.checkpoint_layers != "auto" else None, "")
    if x.checkpoint_layers != "auto":
        value = x.checkpoint_layers
        return _predict(x, layers if value is None else min(int(value), layers), value, "")
    if x.target_gib is None:
        return _predict(x, layers, None, "no GPU memory known, so every layer is checkpointed "
                                         "(set train.gpu_mem_gib to let auto keep activations)")
    budget = (1 - MARGIN) * x.target_gib * GIB
    if _predict(x, layers, None, "").needed_bytes > budget:
        return _predict(x, layers, None, f"even with every layer checkpointed the run needs more than "
                                         f"{(1 - MARGIN) * x.target_gib:.1f} GiB")
    if x.offload_activations:
        return _auto_under_offload(x, budget)
    # needed() never grows with more checkpointed layers: bisect for the fewest that fit.
    low, high = 0, layers
    while low < high:
        middle = (low + high) // 2
        if _predict(x, middle, middle, "").needed_bytes <= budget:
            high = middle
        else:
            low = middle + 1
    found = _predict(x, low, low, "")
    note = (f"{low} of {layers} layers checkpointed, {layers - low} keep their activations: needs "
            f"{_g(found.needed_bytes)} of {x.target_gib:g} GiB, keeping a {MARGIN:.0%} margin")
    return dataclasses.replace(found, checkpoint_layers=None if low >= layers else low, auto=note)


# train.offload_activations=null turns offload on where a step carries at least this much work (tokens per step x
# hidden size), as trainer/lora_fused.py's branch does: measured on the Llama-3-8B shape at 8k and 16k tokens per
# step on an H200 (bench/RESULTS.md, runs 6-12), where half the layers offloaded whole and half recomputed is
# 10-15% faster than recomputing every layer and needs less GPU memory. Below it (small models, short steps),
# where the copies and the pinned buffers were not measured to pay, it stays off.
OFFLOAD_MIN_WORK = 2**25


def offload_default_reason(x: Inputs) -> Optional[str]:
    """Why train.offload_activations=null leaves offload off for these inputs (None: it turns it on)."""
    if x.device != "cuda":
        return "the run is not on a GPU"
    if x.world != 1 or x.strategy != "single":
        return "more than one process shares the node's host memory and link (strategy is not single)"
    if not x.do_train:
        return "the run does not train"
    if not x.gradient_checkpointing:
        return "gradient checkpointing is off"
    if x.checkpoint_layers is not None:
        return "train.checkpoint_layers is set (it decides the split by itself)"
    if x.shape is None:
        return "the model's shape is not known"
    if x.shape.hidden * x.batch * x.seq < OFFLOAD_MIN_WORK:
        return (f"a step of {x.batch * x.seq} tokens x hidden {x.shape.hidden} is under the work where it was "
                f"measured to pay ({OFFLOAD_MIN_WORK})")
    if x.host_budget is None:
        return "the node's host memory is not known (set train.host_mem_gib)"
    return None


def _with_default_offload(x: Inputs) -> Inputs:
    """train.offload_activations=null: half the layers offloaded whole, half checkpointed with their input
    offloaded (the split measured fastest at the least memory), where offload_default_reason finds nothing against
    it, the pinned bytes fit DEFAULT_HOST_SHARE of the host's memory and the run still fits the GPU (where it does not
    fit either way: needs no more than with every layer checkpointed)."""
    if not x.offload_auto or offload_default_reason(x) is not None:
        return dataclasses.replace(x, offload_auto=False)
    assert x.shape is not None and x.host_budget is not None
    on = dataclasses.replace(x, offload_activations=True, checkpoint_layers=x.shape.layers // 2, offload_layers=None)
    with_offload, without = predict_inputs(on), predict_inputs(dataclasses.replace(x, offload_auto=False))
    from trainer.memory.host import DEFAULT_HOST_SHARE, HOST_SHARE

    # host_budget is HOST_SHARE of the node's memory per process; a default pins at most DEFAULT_HOST_SHARE of it
    host_budget = x.host_budget * DEFAULT_HOST_SHARE / HOST_SHARE
    # It must not turn a run that fits the GPU into one that does not; where none fits, only if it needs less.
    gpu_budget = (1 - MARGIN) * x.target_gib * GIB if x.target_gib is not None else 0.0
    limit = gpu_budget if without.needed_bytes <= gpu_budget else without.needed_bytes
    fits = with_offload.needed_bytes <= limit
    if with_offload.host_bytes > host_budget or not fits:
        return dataclasses.replace(x, offload_auto=False)
    return on


def offload_ladder(layers: int) -> List[Tuple[int, int]]:
    """Splits of the stack under offload, fastest first, as (checkpointed, offloaded whole); the rest are kept.

    Each rung needs no more GPU memory than the one before: a kept layer (its activations on the GPU, no copies,
    no recompute) first becomes an offloaded one (on the host, no recompute; offloaded layers hold two layers on
    the GPU whatever their number) while at most half the stack is offloaded, since past about half the host link
    is what the step waits for (bench/RESULTS.md, run 6); then kept layers become checkpointed ones (recompute,
    only the input on the host), then offloaded ones do.
    """
    half = layers - layers // 2
    rungs = [(0, o) for o in range(0, half + 1)]  # kept -> offloaded
    rungs += [(c, half) for c in range(1, layers - half + 1)]  # kept -> checkpointed
    rungs += [(layers - o, o) for o in range(half - 1, -1, -1)]  # offloaded -> checkpointed
    return rungs


def _auto_under_offload(x: Inputs, budget: float) -> Prediction:
    """checkpoint_layers=auto with train.offload_activations: the fastest rung of offload_ladder that fits."""
    layers = x.shape.layers if x.shape else 0
    rungs = offload_ladder(layers)

    @functools.cache  # the bisection, the host scan and the answer ask for the same rungs
    def prediction(rung: Tuple[int, int]) -> Prediction:
        checkpointed, offloaded = rung
        return _predict(dataclasses.replace(x, offload_layers=offloaded), checkpointed, checkpointed, "")

    # GPU memory never grows down the ladder: bisect for the first rung that fits (the last one, every layer
    # checkpointed, was found to fit by the caller)
    low, high = 0, len(rungs) - 1
    while low < high:
        middle = (low + high) // 2
        if prediction(rungs[middle]).needed_bytes <= budget:
            high = middle
        else:
            low = middle + 1
    # Host memory does not fall monotonically (kept layers turning into offloaded ones add to it): from there, the
    # first rung whose pinned bytes the node can hold too (else this one, which memory.host_offload refuses).
    host_note = ""
    if x.host_budget is not None:
        fitting = next((i for i in range(low, len(rungs)) if prediction(rungs[i]).host_bytes <= x.host_budget), None)
        if fitting is not None and fitting != low:
            low, host_note = fitting, f", and {_g(prediction(rungs[fitting]).host_bytes)} of pinned host memory " \
                                      f"(the node's share per process: {_g(x.host_budget)})"
    checkpointed, offloaded = rungs[low]
    found = prediction(rungs[low])
    kept = layers - checkpointed - offloaded
    parts = [f"{kept} of {layers} layers keep their activations on the GPU"] if kept else []
    parts += [f"{offloaded} of {layers} layers offload all their activations to host memory"] if offloaded else []
    parts += [f"{checkpointed} of {layers} layers are checkpointed (their input offloaded)"] if checkpointed else []
    note = (", ".join(parts) + f" (train.offload_activations): needs {_g(found.needed_bytes)} of "
            f"{x.target_gib:g} GiB, keeping a {MARGIN:.0%} margin" + host_note)
    return dataclasses.replace(found, checkpoint_layers=None if checkpointed >= layers else checkpointed,
                               offload_layers=offloaded, auto=note)


def _bytes(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def _targeted(x: Inputs) -> List[Tuple[str, int, int]]:
    """The decoder linears the adapter wraps (peft's all-linear: every one of them; lm_head never)."""
    assert x.shape is not None
    if x.peft not in ("lora", "dora", "pissa", "oft"):
        return []
    wanted = set(x.targets)
    if "all-linear" in wanted:
        return x.shape.linears()
    return [(n, a, b) for n, a, b in x.shape.linears() if n in wanted]


def base_bytes_per_param(x: Inputs, rows: int, cols: int) -> Tuple[float, float, str]:
    """(bytes of the stored weight, bytes of its quantization constants, label) for one decoder linear.

    rows x cols is out_features x in_features. Quantization constants are what FSDP and ZeRO-3 never shard.
    """
    c = _bytes(x.dtype)
    n = rows * cols
    method, bits = x.method, x.bits
    quant = dict(x.shape.quantization) if x.shape else {}
    if method in ("none", "fp8", "mxfp4"):  # FP8/MXFP4 are dequantized to the compute dtype on load
        return n * c, 0.0, f"{x.dtype}"
    if method == "bnb" and bits == 8:
        # LLM.int8: int8 weights and one fp32 scale per output row (SCB).
        return float(n), 4.0 * rows, "bnb int8 + fp32 row scales"
    if method == "bnb":
        # NF4/FP4: 4 bits per weight, one absmax per 64-weight block: fp32, or with double quantization an
        # 8-bit code per block plus an fp32 absmax per 256 blocks; the 16-entry code and the nested 256-entry
        # code (fp32) per weight matrix. Packed storage is the compute dtype here (same bytes).
        blocks = math.ceil(n / 64)
        consts = (blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4) if x.double_quant else 4 * blocks
        return n / 2, consts + 16 * 4, "bnb nf4" + (" + double quant" if x.double_quant else "")
    if method == "hqq":
        b = int(bits or 4)
        g = max(x.group_size, 1)
        # hqq 0.2.x packing: 8/6/5 bits as one uint8 each, 4 bits two per uint8, 3 bits ten per int32
        # (rows padded to a multiple of 10), 2 bits four per uint8, 1 bit eight; scale and zero per group
        # in the compute dtype (quant_zero / quant_scale off).
        groups = math.ceil(n / g)
        packed = {8: n, 6: n, 5: n, 4: n / 2, 3: 4 * math.ceil(groups / 10) * g, 2: n / 4, 1: n / 8}.get(b, n)
        return float(packed), 2.0 * c * groups, f"hqq {b}-bit, group {g}"
    if method == "eetq":
        return float(n), 2.0 * rows, "eetq int8 + fp16 row scales"
    if method in ("gptq", "awq"):
        b = int(quant.get("bits", bits or 4))
        g = int(quant.get("group_size", 128))
        g = cols if g <= 0 else g
        groups = math.ceil(cols / g)
        # packed weights, fp16 scales and packed zeros per (group, output); GPTQ's g_idx per input feature.
        consts = rows * groups * (2 + b / 8) + (4 * cols if method == "gptq" else 0)
        return n * b / 8, consts, f"{method} {b}-bit, group {g}"
    if method == "aqlm":
        codebooks = int(quant.get("num_codebooks", 1))
        nbits = int(quant.get("nbits_per_codebook", 16))
        in_group, out_group = int(quant.get("in_group_size", 8)), int(quant.get("out_group_size", 1))
        codes = n * codebooks * nbits / 8 / (in_group * out_group)
        return codes, codebooks * 2**nbits * in_group * out_group * 2 + 2 * rows, \
            f"aqlm {codebooks}x{nbits}, groups {out_group}x{in_group}"
    return n * c, 0.0, f"{method} (unknown layout: counted as {x.dtype})"


def _dequant_factor(x: Inputs) -> float:
    """Temporary full-width copies a quantized linear makes of its weight while computing (x compute bytes)."""
    if x.method in ("none", "fp8", "mxfp4"):
        return 0.0
    if x.method == "hqq":
        return 3.0  # unpacked values, (W - zero), (W - zero) * scale: three compute-dtype tensors at once
    return 1.0  # bnb 4/8-bit, eetq, GPTQ/AWQ/AQLM torch kernels: one dequantized weight per call


def _adapter_params(x: Inputs) -> Tuple[float, str]:
    """Trainable adapter parameters (count) and a label; peft keeps them in fp32 (cast_adapter_dtype)."""
    total = 0.0
    for _, fan_in, fan_out in _targeted(x):
        if x.peft == "oft":
            block = x.oft_block_size or max(fan_in // max(x.r, 1), 1)
            blocks = max(fan_in // block, 1)
            total += blocks * block * (block - 1) / 2
        else:
            total += x.r * (fan_in + fan_out) + (fan_out if x.peft == "dora" else 0)
    label = {"oft": "OFT blocks", "dora": f"DoRA r={x.r} + magnitudes"}.get(x.peft, f"LoRA r={x.r}")
    return total * x.shape.layers, label


def _optimizer_bytes_per_param(optim: str, param_bytes: int) -> Tuple[float, str]:
    name = optim.lower()
    if "8bit" in name:
        return 2.0 + 8 / 2048, "8-bit AdamW (2 x 1 byte + blockwise scales)"
    if name.startswith("sgd"):
        return 0.0, "SGD (no state)"
    if "adafactor" in name:
        return 0.0, "Adafactor (factored second moment, counted as 0)"
    if "lion" in name or name in ("rmsprop", "adagrad"):
        return float(param_bytes), f"{optim} (1 state in the parameter dtype)"
    if "adam" in name:
        return 2.0 * param_bytes, f"AdamW (2 states in the parameter dtype, {param_bytes} B each)"
    return 2.0 * param_bytes, f"{optim} (unknown to this model: 2 states assumed)"


def _predict(x: Inputs, checkpointed: int, resolved: Any, auto_note: str) -> Prediction:
    """One prediction for a fixed number of checkpointed layers (the first `checkpointed` ones)."""
    s = x.shape
    assert s is not None
    c = _bytes(x.dtype)
    notes: List[str] = []
    layers, H = s.layers, s.hidden
    world, strategy = x.world, x.strategy
    fsdp = strategy == "fsdp" and world >= 2  # one process: the Trainer does not wrap (strategies.resolve)
    zero = strategy in ("zero2", "zero3", "zero3_offload") and (world >= 2 or x.device == "cuda")
    zero3 = zero and strategy != "zero2"
    ds_cast = zero and x.dtype != "float32"  # DeepSpeed casts the module's parameters to bf16/fp16
    adapter = x.peft in ("lora", "dora", "pissa", "oft")
    shard = world if (fsdp or zero3) else 1
    offloaded = x.offload_params and (fsdp or zero3)
    if s.experts:
        notes.append("mixture of experts: every expert's weights are counted, activations as if each token "
                     "passed one expert-sized MLP (approximate)")
    if s.model_type not in ("llama", "mistral", "qwen2", "qwen3"):
        notes.append(f"activations follow the Llama decoder layer; {s.model_type}'s may differ (approximate)")
    if x.device == "cuda" and x.liger_auto and not x.liger:
        notes.append("liger-kernel is not installed here, so its kernels are assumed off (more activation "
                     "memory); model.liger=true predicts them on")

    def local(nbytes: float, rows: int, cols: int = 1) -> float:
        """One tensor's bytes on one GPU: FSDP2 shards dim 0 (padded to the world size); ZeRO-3 partitions every
        parameter and keeps small ones (<= 10 x hidden elements, the "auto" stage3_param_persistence_threshold)
        gathered as well, for the whole run."""
        if offloaded or rows * cols <= 0:
            return 0.0
        if fsdp:
            return nbytes * math.ceil(rows / world) / rows
        if zero3:
            part = nbytes * math.ceil(rows * cols / world) / (rows * cols)
            return part + (nbytes if rows * cols <= 10 * H else 0.0)
        return nbytes

    static: List[Term] = []
    linears = s.linears()
    label = ""
    weights = consts = 0.0
    for _, fan_in, fan_out in linears:
        stored, const, label = base_bytes_per_param(x, fan_out, fan_in)
        if x.method == "bnb" and x.bits == 4:
            # packed 4-bit storage is one column of compute-dtype elements (bnb_4bit_quant_storage)
            weights += local(stored, max(int(stored // c), 1))
        else:
            weights += local(stored, fan_out, max(int(stored // max(fan_out, 1) // c), 1))
        consts += const
    weights, consts = weights * layers, consts * layers
    each = f", 1/{shard} each" if shard > 1 and not offloaded else (", offloaded to CPU" if offloaded else "")
    static.append(Term(f"base weights ({label}{each})", weights,
                       f"{sum(a * b for _, a, b in linears) * layers / 1e9:.2f}B decoder linear parameters"))
    if consts:
        static.append(Term("quantization constants" + (" (not sharded)" if shard > 1 else ""), consts))
    embed = s.vocab * H * c
    on_host = embeddings_on_host(x)
    # lm_head follows the table to the host where the chunked loss reads it: copied in for the loss only
    head_on_host = on_host and _fused_ce(x)
    head_copy = [Term("lm_head, copied in from host memory for the loss", embed)] if head_on_host else []
    if on_host:
        notes.append(f"embeddings: the {_g(embed)} table in pinned host memory, read by the GPU row by row"
                     + (", and lm_head's weight, copied in for each loss" if head_on_host else "")
                     + " (train.embeddings_on_host)")
    static.append(Term("embeddings" + (" (tied with lm_head)" if s.tied else "") + each,
                       0.0 if on_host else local(embed, s.vocab, H)))
    if not s.tied:
        static.append(Term("lm_head" + each, 0.0 if head_on_host else local(embed, s.vocab, H)))
    norm_bytes = c if ds_cast or not x.upcast_layernorm else 4
    norms = sum(local(H * norm_bytes, H) for _ in range(2 * layers + 1))
    if s.qkv_bias:
        norms += layers * sum(local(w * c, w) for w in (s.q_width, s.kv_width, s.kv_width))
    static.append(Term("norms" + (" (fp32)" if norm_bytes == 4 else "") + (" and q/k/v biases" if s.qkv_bias
                                                                              else ""), norms))

    # trainable parameters, their gradients and optimizer state
    if adapter:
        count, adapter_label = _adapter_params(x)
        param_bytes = 2 if ds_cast else 4  # peft upcasts adapters to fp32 (cast_adapter_dtype); DeepSpeed to bf16
        if x.peft == "oft":
            held = count * param_bytes / shard
        else:
            # LoRA A is r x in, B is out x r (dim 0 of A is r rows: FSDP2's padding shows once world > r).
            held = sum(local(x.r * fan_in * param_bytes, x.r, fan_in) + local(fan_out * x.r * param_bytes, fan_out,
                                                                                 x.r)
                       for _, fan_in, fan_out in _targeted(x)) * layers
        static.append(Term(f"{adapter_label} parameters ({'bf16' if param_bytes == 2 else 'fp32'}{each})", held,
                           f"{count / 1e6:.1f}M parameters"))
    else:
        per_layer = sum(a * b for _, a, b in linears) + 2 * H
        if x.peft == "full":
            count = per_layer * layers + s.vocab * H * (1 if s.tied else 2) + H
        elif x.peft == "freeze":
            count = per_layer * min(x.freeze_layers, layers)
        else:
            count = 0.0
        param_bytes = c
    opt_shard = world if (fsdp or zero) else 1
    optimizer_offloaded = (zero and x.offload_optimizer) or (fsdp and x.offload_params)
    optim_per, optim_label = _optimizer_bytes_per_param(x.optim, 4 if zero else param_bytes)
    if x.do_train and count:
        if zero and (ds_cast or not zero3):
            # ZeRO-1/2 always step an fp32 copy of their partition; ZeRO-3 only when the parameters are 16-bit.
            static.append(Term(f"DeepSpeed fp32 master copy (1/{opt_shard} each)" if not optimizer_offloaded else
                               "DeepSpeed fp32 master copy (offloaded to CPU)",
                               0.0 if optimizer_offloaded else count * 4 / opt_shard))
        static.append(Term(f"optimizer state: {optim_label}" + (f", 1/{opt_shard} each" if opt_shard > 1 else "")
                           + (", offloaded to CPU" if optimizer_offloaded else ""),
                           0.0 if optimizer_offloaded else count * optim_per / opt_shard))
        if strategy == "ddp" and world >= 2:
            static.append(Term("DDP gradient buckets (a flat copy of the gradients)", count * param_bytes))
        if zero:
            # reduce_bucket_size "auto" = hidden^2 elements, double-buffered (overlap_comm), and the fp32
            # gradient partition (on CPU when the optimizer is offloaded).
            static.append(Term("ZeRO gradient buckets and fp32 gradient partition",
                               2 * H * H * c + (0.0 if optimizer_offloaded else count * 4 / opt_shard)))

    # the strategy's gathered parameters while layers run
    layer_full = sum(base_bytes_per_param(x, b, a)[0] for _, a, b in linears) + \
        (sum(x.r * (a + b) for _, a, b in _targeted(x)) * c if adapter and x.peft != "oft" else 0)
    gathered_fwd: List[Term] = []
    gathered_bwd: List[Term] = []
    if fsdp:
        # FSDP2 all-gathers a decoder layer before it runs and prefetches the next; the root module's own
        # parameters (embeddings, lm_head) stay gathered from the forward pass through the backward.
        heads = 1 if s.tied else 2
        gathered_fwd = gathered_bwd = [
            Term("FSDP root gathered (embeddings, lm_head)", heads * (embed - local(embed, s.vocab, H))),
            Term("FSDP all-gathered layers (current + prefetched)", 2 * layer_full)]
    elif zero3:
        # ZeRO-3 releases a gathered parameter only once more than stage3_max_live_parameters elements are
        # resident (DeepSpeed's default 1e9; qforge's config leaves it), so a model with fewer stored elements
        # than that ends the forward pass wholly gathered (docs/strategies_gpu.md: 2.11 GiB per GPU against
        # FSDP's 1.5). Stored elements: bnb's packed 4-bit weights count in compute-dtype elements.
        elements = (layer_full * layers + embed * (1 if s.tied else 2)) / c
        gathered = [Term("ZeRO-3 gathered parameters (up to stage3_max_live_parameters, 1e9 elements)",
                         min(elements, ZERO3_MAX_LIVE_PARAMETERS) * c)]
        gathered_fwd = gathered_bwd = gathered

    act = _activations(x, checkpointed)
    phases: List[Phase] = []
    cal = CALIBRATION

    def scaled(terms: Sequence[Term], factor: float) -> List[Term]:
        return [Term(t.name, t.bytes * factor, t.note) for t in terms]

    if x.do_train:
        phases.append(Phase("forward end (loss)", scaled([*act.kept, *act.model_fwd], cal.activations)
                            + scaled(act.loss, cal.transients) + gathered_fwd + head_copy))
        backward = scaled([*act.kept_bwd, *act.model_bwd], cal.activations) + scaled(act.backward, cal.transients)
        if x.peft == "full" and not s.tied:
            backward.append(Term("lm_head gradient", local(embed, s.vocab, H)))
        phases.append(Phase("backward", backward + gathered_bwd))
        grads = 0.0 if zero else sum(local(count * param_bytes / layers, 1) for _ in range(layers)) / \
            (world if fsdp else 1)
        phases.append(Phase("optimizer step", [
            Term("gradients", grads),
            Term("optimizer step temporaries (one state-sized tensor)",
                 0.0 if optimizer_offloaded else count * (4 if zero else param_bytes) / opt_shard)]))
    if x.do_eval:
        phases.append(Phase("eval forward", scaled(act.eval, cal.transients) + gathered_fwd + head_copy))
    load = _load_phase(x, linears, embed)
    if load is not None:
        phases.append(load)
    return Prediction(
        known=True, shape_source=x.shape_source, shape=s.describe(), device=x.device, dtype=x.dtype, world=world,
        strategy=strategy, tokens=act.tokens, layers=layers, checkpointed=checkpointed, checkpoint_layers=resolved,
        offload_layers=offloaded_layers(x, checkpointed) if x.offload_activations else None,
        auto=auto_note, static=static, phases=phases, target_gib=x.target_gib, target_source=x.target_source,
        assumptions=notes + act.notes,
        host_bytes=(act.host if x.do_train else 0.0) + embed * (int(on_host) + int(head_on_host)),
        embeddings_on_host=on_host, offload_activations=x.offload_activations,
        offload_by_default=x.offload_auto and x.offload_activations,
    )


def embeddings_on_host(x: Inputs) -> bool:
    """train.embeddings_on_host for these inputs: null is on wherever trainer/host_embeddings says it applies."""
    from trainer import host_embeddings

    return host_embeddings.resolve(x.embeddings_on_host, embeddings_reason(x))


def embeddings_reason(x: Inputs) -> Optional[str]:
    """Why the embedding table cannot live in host memory for these inputs (None: it can)."""
    from trainer import host_embeddings

    return host_embeddings.why_not(
        x.device, x.strategy, x.world, x.peft, host_embeddings.trains_embeddings(x.peft, x.resize_vocab),
        x.shape.tied if x.shape is not None else None, x.device_map_auto)


def _load_phase(x: Inputs, linears: List[Tuple[str, int, int]], embed: float) -> Optional[Phase]:
    """Loading, before any optimizer state: every rank holds the whole quantized model, even where a strategy
    shards it afterwards (model.load_model quantizes on each rank's GPU; FSDP and ZeRO-3 then move shards).
    An unquantized model under FSDP / ZeRO-3 loads on CPU, so its GPU never holds more than its shard."""
    s = x.shape
    assert s is not None
    c = _bytes(x.dtype)
    quantized = x.method not in ("none", "fp8", "mxfp4")
    sharded = x.strategy in SHARDED_STRATEGIES and x.world >= 2
    if x.device_map_auto or (sharded and not quantized):
        return None
    weights = consts = 0.0
    for _, fan_in, fan_out in linears:
        stored, const, _ = base_bytes_per_param(x, fan_out, fan_in)
        weights, consts = weights + stored, consts + const
    largest = max(a * b for _, a, b in linears)
    # hqq quantizes each weight on the GPU in fp32 with its optimiser's copies; the others convert one
    # compute-dtype tensor at a time.
    in_flight = (16 if x.method == "hqq" else 2) * largest * c
    return Phase("loading", [
        Term("base weights and quantization constants, whole on this GPU" if sharded else
             "base weights and quantization constants", (weights + consts) * s.layers),
        Term("embeddings and lm_head, whole", embed * (1 if s.tied else 2)),
        Term("norms", (2 * s.layers + 1) * s.hidden * 4),
        Term("one weight in flight while loading", in_flight)], standalone=True)


@dataclass
class _Activations:
    tokens: int
    kept: List[Term]  # layer activations at the end of the forward pass
    kept_bwd: List[Term]  # layer activations at the worst moment of the backward pass
    model_fwd: List[Term]  # model-level tensors at the end of the forward pass
    model_bwd: List[Term]  # model-level tensors that live through the backward pass
    loss: List[Term]
    backward: List[Term]
    eval: List[Term]
    notes: List[str]
    host: float = 0.0  # pinned host bytes per GPU that train.offload_activations keeps (trainer/offload.py)


def layer_tensors(x: Inputs, tokens: int, batch: int, seq: int) -> Tuple[float, float, float, List[str]]:
    """What one decoder layer keeps for backward: (un-checkpointed, checkpointed, shared with its input, notes).

    "shared" is the part of the un-checkpointed figure that is the layer's input itself (kept by liger's norm
    or an fp32 HF norm), which the checkpoint of a recomputed layer already holds.
    """
    s = x.shape
    assert s is not None
    c = _bytes(x.dtype)
    N, H, inter = tokens, s.hidden, s.intermediate
    Hq, Hkv = s.q_width, s.kv_width
    notes: List[str] = []
    lora_like = x.peft in ("lora", "dora", "pissa", "oft")  # DoRA and OFT approximated by peft's LoRA forward
    targeted = {n for n, _, _ in _targeted(x)} if lora_like else set()
    fused = _fused_lora(x) and bool(targeted)
    unfused = bool(targeted) and not fused
    p = x.dropout if unfused else 0.0
    # Frozen base layers that keep their input: HQQ's autograd function saves it, bnb 8-bit holds it on its
    # ctx, the pre-quantized kernels dequantize and matmul under autograd; trained weights need it anyway.
    keeps_input = x.method in ("hqq", "eetq", "gptq", "awq", "aqlm") or (x.method == "bnb" and x.bits == 8) \
        or x.peft in ("full", "freeze")
    if x.method in ("eetq", "gptq", "awq", "aqlm"):
        notes.append(f"{x.method}: its kernel is assumed to keep its input for backward (not measured)")
    if x.peft in ("full", "freeze"):
        notes.append(f"peft={x.peft}: every layer counted as keeping its linears' inputs (approximate for freeze, "
                     "whose frozen layers keep less)")
    if x.peft in ("dora", "oft"):
        notes.append(f"peft={x.peft}: its layers are counted like peft's LoRA forward (approximate)")
    # the fused branch recomputes norm outputs and the SwiGLU product instead of keeping them (lora_fused.py);
    # peft keeps the input itself only without dropout (nn.Identity), else a mask and the dropped copy.
    recipe_mlp = fused and (x.liger or s.model_type in ("llama", "mistral", "qwen2", "qwen3"))

    def input_kept(names: Sequence[str], has_recipe: bool) -> bool:
        if keeps_input:
            return True
        adapted = [n for n in names if n in targeted]
        if not adapted:
            return False
        if fused:
            return not has_recipe
        return p == 0.0

    def dropped(names: Sequence[str], width: int) -> float:
        """peft's dropout per adapted layer: a bool mask and the dropped copy (compute dtype, under autocast)."""
        if not unfused or p == 0.0:
            return 0.0
        return sum((1 + c) * N * width for n in names if n in targeted)

    mask = x.packing and x.packed_rows and x.attn in ("sdpa", "eager")
    kv = Hq if (mask or x.attn == "eager") else Hkv  # a mask (or eager) makes transformers repeat k/v per head
    if x.compile:
        return _compiled_layer_tensors(x, N, batch, seq, kv, mask, keeps_input, targeted, notes)
    own_input = liger_or_fp32 = x.liger or c == 4
    norm_in = c * N * H if liger_or_fp32 else 4 * N * H  # liger keeps x itself; HF RMSNorm an fp32 copy of it
    full = norm_in  # input norm
    full += c * N * H if input_kept(("q_proj", "k_proj", "v_proj"), True) else 0.0
    full += dropped(("q_proj", "k_proj", "v_proj"), H)
    full += c * N * x.r * len(targeted)  # rank-r activations (lora_A's output / the fused branch's)
    full += _attention_tensors(x, N, batch, seq, kv, mask)
    # o_proj's input is SDPA's output (kept already); the fused branch and HQQ/int8 keep that same storage.
    full += c * N * Hq if x.attn == "eager" and input_kept(("o_proj",), False) else 0.0
    full += dropped(("o_proj",), Hq)
    full += norm_in  # post-attention norm: the residual, or an fp32 copy of it
    full += c * N * H if input_kept(("gate_proj", "up_proj"), True) else 0.0
    full += dropped(("gate_proj", "up_proj"), H)
    full += (2 if x.liger else 3) * c * N * inter  # liger's SwiGLU keeps gate and up; HF's gate, silu(gate), up
    full += c * N * inter if input_kept(("down_proj",), recipe_mlp) else 0.0
    full += dropped(("down_proj",), inter)
    checkpointed = c * N * H  # a checkpointed layer keeps only its input
    if x.method == "bnb" and x.bits == 8:
        # bnb 8-bit keeps each linear's input on ctx.tensors, which checkpointing's saved-tensor hooks never
        # see: a checkpointed layer still holds its norm outputs, attention output and MLP product.
        checkpointed += c * N * (2 * H + Hq + inter)
        notes.append("bnb 8-bit: every linear keeps its input, in checkpointed layers too (ctx.tensors)")
        # LLM.int8 also keeps the input columns that exceed its outlier threshold as a second copy (subA, in the
        # input's dtype), checkpointed or not. Inputs normalised to unit RMS have almost none; down_proj's, the
        # SwiGLU product, is heavy-tailed: a random-weight 8B checkpoint has a value over 6.0 in every column.
        outliers = x.int8_outlier_share * c * N * inter
        full += outliers
        checkpointed += outliers
        notes.append(f"bnb 8-bit: down_proj input columns over LLM.int8's outlier threshold are kept twice, "
                     f"assumed {x.int8_outlier_share:.0%} of them ({s.layers * outliers / GIB:.2f} GiB over "
                     f"{s.layers} layers); a checkpoint with one in every column (random weights) needs "
                     f"{s.layers * c * N * inter / GIB:.2f} GiB (docs/memory.md, Known limits)")
    if mask:
        notes.append("packed rows assumed to hold several examples: SDPA gets a block-diagonal mask "
                     "(batch x seq^2) and k/v repeated to every head")
    return full, checkpointed, (c * N * H if own_input else 0.0), notes


def _attention_tensors(x: Inputs, N: int, batch: int, seq: int, kv: int, mask: bool) -> float:
    """q, k, v, attention output and logsumexp, plus what eager attention or a packed mask adds."""
    s = x.shape
    assert s is not None
    c = _bytes(x.dtype)
    kept = c * N * (s.q_width + 2 * kv) + c * N * s.q_width + 4 * N * s.heads
    if x.attn == "eager":
        kept += (4 + (c if c < 4 else 0)) * batch * s.heads * seq * seq  # fp32 softmax and its cast
    elif mask:
        kept += c * batch * seq * seq  # SDPA turns the bool mask into an additive bias on every call
    return kept


def _compiled_layer_tensors(x: Inputs, N: int, batch: int, seq: int, kv: int, mask: bool, keeps_input: bool,
                            targeted: Set[str], notes: List[str]) -> Tuple[float, float, float, List[str]]:
    """train.compile: what the compiled layer saves once AOTAutograd recomputes its pointwise ops
    (trainer/compile_layers.py RECOMPUTE): the layer's input and the residual after attention, the norms' fp32
    row statistics, attention's tensors, gate and up (SwiGLU's backward needs both), the rank-r products. Norm
    outputs, casts and the SwiGLU product are recomputed. Measured with saved-tensor hooks on a bnb4 LoRA layer
    of Llama-3 proportions under bf16 autocast (tests/test_compile.py checks the count)."""
    s = x.shape
    assert s is not None
    c = _bytes(x.dtype)
    H, inter = s.hidden, s.intermediate
    full = 2 * c * N * H + 2 * 4 * N  # the input, the residual; one fp32 statistic per row and norm
    full += c * N * x.r * len(targeted)
    full += _attention_tensors(x, N, batch, seq, kv, mask)
    full += 2 * c * N * inter  # gate and up
    if keeps_input:  # the base layers' own autograd keeps their inputs: norm outputs, attention output, product
        full += c * N * (2 * H + s.q_width + inter)
    if targeted and x.dropout > 0:
        full += N * (3 * H + s.q_width + inter)  # a bool dropout mask per adapted input width (approximate)
        notes.append("train.compile with LoRA dropout: one bool mask per adapted input counted (not measured)")
    checkpointed = c * N * H
    if x.method == "bnb" and x.bits == 8:
        checkpointed += c * N * (2 * H + s.q_width + inter)
    if mask:
        notes.append("packed rows assumed to hold several examples: SDPA gets a block-diagonal mask "
                     "(batch x seq^2) and k/v repeated to every head")
    if x.device == "cuda":
        # what is saved is modelled (and measured); inductor's backward temporaries are not yet
        notes.append("train.compile: the compiled backward's temporaries are not modelled yet; on an H200 the "
                     "Llama-3-8B shape peaked 0.9 GiB (8k tokens) to 1.5 GiB (16k) above this prediction "
                     "(bench/RESULTS.md, run 10)")
    return full, checkpointed, c * N * H, notes


def _fused_lora(x: Inputs) -> bool:
    """Whether trainer.speed installs the fused LoRA branch (train.fused_lora tri-state and the work rule)."""
    s = x.shape
    if x.peft not in ("lora", "pissa") or x.fused_lora is False or x.strategy in NO_FUSED_LORA_STRATEGIES \
            or x.compile:
        return False
    if x.fused_lora is True:
        return True
    return s is not None and s.hidden * x.batch * x.seq >= FUSED_LORA_MIN_WORK


def _fused_ce(x: Inputs) -> bool:
    """trainer.speed's chunked loss: where the strategy allows it, and not when lm_head is trained."""
    return x.fused_ce and x.strategy not in NO_FUSED_CE_STRATEGIES and x.peft != "full"


def offloaded_layers(x: Inputs, checkpointed: int) -> int:
    """How many un-checkpointed layers offload everything they save (train.offload_layers, at most all of them)."""
    if not x.offload_activations or x.shape is None:
        return 0
    plain = x.shape.layers - checkpointed
    return plain if x.offload_layers is None else min(x.offload_layers, plain)


def _activations(x: Inputs, checkpointed: int) -> _Activations:
    s = x.shape
    assert s is not None
    c = _bytes(x.dtype)
    batch, seq = x.batch, x.seq
    N = batch * seq
    H, inter, V, L = s.hidden, s.intermediate, s.vocab, s.layers
    full, ckpt, shared, notes = layer_tensors(x, N, batch, seq)
    plain = L - checkpointed
    mask = x.packing and x.packed_rows and x.attn in ("sdpa", "eager")
    held = checkpointed * ckpt
    held_name = f"checkpointed layer inputs ({checkpointed} of {L} layers)"
    host = 0.0
    if x.offload_activations and checkpointed:
        # trainer/offload.py: each input goes to pinned host memory as the forward pass makes it and comes back
        # one layer ahead in backward, so two are on the GPU at a time. What bnb 8-bit holds on its autograd
        # ctx (layer_tensors) is not a saved tensor and stays.
        moved = c * N * H
        held = checkpointed * (ckpt - moved) + min(checkpointed, 2) * moved
        held_name += ", offloaded: 2 on the GPU at a time"
        host += checkpointed * moved
        notes.append(f"activation offload: {checkpointed * moved / GIB:.2f} GiB of layer inputs per GPU in pinned "
                     "host memory")
    plain_held, plain_name = plain * full, f"activations of un-checkpointed layers ({plain} x {full / GIB:.3f} GiB)"
    offloaded = offloaded_layers(x, checkpointed)
    if offloaded:
        # trainer/offload.py: an un-checkpointed layer's saved tensors go to the host too; in backward the layer
        # computing and the one prefetched are on the GPU (and in forward the copies may lag by as much).
        # What bnb 8-bit holds on its autograd ctx (the part of a checkpointed layer beyond its input) stays.
        # The layers that keep theirs (train.offload_layers < the un-checkpointed ones) are spread among them.
        on_ctx = ckpt - c * N * H
        on_gpu = plain - offloaded
        plain_held = (on_gpu + min(offloaded, 2)) * full + (offloaded - min(offloaded, 2)) * on_ctx
        plain_name += f", {offloaded} offloaded: 2 of them on the GPU at a time"
        host += offloaded * (full - on_ctx)
        notes.append(f"activation offload: {offloaded * full / GIB:.2f} GiB of un-checkpointed layers' activations "
                     "per GPU in pinned host memory")
    kept = [Term(held_name, held), Term(plain_name, plain_held)]
    # The backward pass at its worst: the last layer's backward with every layer's activations still held,
    # or the recompute of the last checkpointed layer (the un-checkpointed layers are done by then).
    last = held + plain_held if plain else 0.0
    recompute = held + full - shared if checkpointed else 0.0
    if recompute > last:
        kept_bwd = [Term(held_name, held),
                    Term("a checkpointed layer recomputed for its backward", full - shared)]
    else:
        kept_bwd = list(kept)
    model_bwd = [Term("rotary cos/sin", 2 * c * N * s.head_dim)]
    if mask:
        model_bwd.append(Term("packed attention mask (batch x seq^2)", batch * seq * seq * (c if x.attn == "eager"
                                                                                         else 1)))
    fused_ce = _fused_ce(x)
    model_fwd = [*model_bwd, Term("final norm input", c * N * H if (x.liger or c == 4) else 4 * N * H)]
    if x.peft == "full" and not fused_ce:
        model_fwd.append(Term("lm_head input (the head is trained)", c * N * H))
    if fused_ce and x.liger and x.device == "cuda":
        # liger's fused linear cross-entropy: the hidden's gradient is computed in the forward pass; its
        # chunk has next_pow2(tokens / ceil(vocab / hidden)) rows of logits in the compute dtype.
        rows = 2 ** math.ceil(math.log2(max(math.ceil(N / math.ceil(V / H)), 1)))
        loss = [Term("loss: gradient of the hidden states (liger chunked CE)", c * N * H),
                Term("loss: one chunk of logits", min(rows, N) * V * c + 4 * N)]
    elif fused_ce:
        # trainer.fused_loss: the hidden's gradient and its scaled copy; one chunk's logits in the compute
        # dtype, in fp32, and the probabilities cast back.
        rows = max(1, TORCH_CE_CHUNK_ELEMENTS // V)
        loss = [Term("loss: gradient of the hidden states (chunked CE)", 2 * c * N * H),
                Term("loss: one chunk of logits", min(rows, N) * V * (4 + (c if c < 4 else 0)))]
    else:
        # stock head: at the start of the backward pass the fp32 log-softmax, its incoming gradient and its
        # result (3 x 4 bytes per token and vocabulary entry; the forward's bf16 + fp32 + log-softmax is less).
        loss = [Term("logits and loss (stock head: 12 bytes per token per vocabulary entry)", 12 * N * V)]
    # One layer's backward: the gradient arriving, the MLP product's gradient from the LoRA branch and from
    # the base layer, and the base layer's dequantized weight (HF's MLP without liger: 3 intermediate grads).
    largest = max(a * b for _, a, b in s.linears())
    dequant = _dequant_factor(x) * largest * c
    mlp = max(2 * c * N * inter + dequant, 0.0 if x.liger else 3 * c * N * inter)
    attention = c * N * (s.q_width + 2 * s.kv_width) + 4 * N * s.q_width + dequant  # dq, dk, dv, fp32 dq_accum
    backward = [Term("gradients of one layer's activations", c * N * H + max(mlp, attention) - dequant)]
    if dequant:
        backward.append(Term("dequantized weight (largest matrix, compute dtype)", dequant))
    # Evaluation keeps nothing for backward. The chunked loss evaluates too (no gradient): the final hidden
    # states and one chunk's logits in the compute dtype and fp32. The stock head: its bf16 logits, their fp32
    # copy and the log-softmax for the whole eval batch.
    eval_tokens = x.eval_batch * seq
    if fused_ce:
        rows = max(1, TORCH_CE_CHUNK_ELEMENTS // V)
        eval_loss = [Term("eval: final hidden states (chunked CE)", c * eval_tokens * H),
                     Term("eval loss: one chunk of logits", min(rows, eval_tokens) * V * (4 + (c if c < 4 else 0)))]
    else:
        eval_loss = [Term(f"eval logits and loss (batch {x.eval_batch}, stock head)",
                          (c + 8 if c < 4 else 8) * eval_tokens * V)]
    evals = [*eval_loss, Term("eval: one layer's temporaries", 3 * c * eval_tokens * inter + dequant)]
    if mask:
        evals.append(Term("eval packed attention mask and its bias", x.eval_batch * seq * seq * (1 + c)))
    return _Activations(tokens=N, kept=kept, kept_bwd=kept_bwd, model_fwd=model_fwd, model_bwd=model_bwd,
                        loss=loss, backward=backward, eval=evals, notes=notes, host=host)


# ---- fixes: the cheapest changes that make a run fit -------------------------------------------------------

@dataclass(frozen=True)
class Fix:
    kind: str  # moves of one kind supersede each other (batch 2, then batch 1)
    text: str  # what to change, in words and overrides
    inputs: Inputs


def _moves(x: Inputs, p: Prediction) -> List[Fix]:
    """Single changes, cheapest for the user first: same training first, then less work per GPU, then less data
    per row. Only changes the rules allow for this composition are offered."""
    return [dataclasses.replace(move, inputs=_redefault(move.inputs)) for move in _own_moves(x, p)]


def _redefault(x: Inputs) -> Inputs:
    """A move that leaves train.offload_activations at null gets the default decided again for its own inputs
    (a smaller batch may fall under the work where offload turns on)."""
    if not x.offload_auto:
        return x
    return _with_default_offload(dataclasses.replace(x, offload_activations=False, checkpoint_layers=None,
                                                     offload_layers=None))


def _own_moves(x: Inputs, p: Prediction) -> List[Fix]:
    s = x.shape
    assert s is not None
    moves: List[Fix] = []
    r = dataclasses.replace
    phase = p.peak_phase.name if p.peak_phase is not None else ""
    if x.do_eval and phase == "eval forward":
        if x.eval_batch > 1:
            moves.append(Fix("eval", "train.eval_batch_size=1", r(x, eval_batch=1)))
        else:
            moves.append(Fix("eval", "do_eval=false", r(x, do_eval=False)))
    if x.do_train and not x.fused_ce and x.strategy not in NO_FUSED_CE_STRATEGIES and x.peft != "full":
        moves.append(Fix("fused_ce", "train.fused_ce=true", r(x, fused_ce=True)))
    if x.do_train and x.fused_lora is False and x.peft in ("lora", "pissa") \
            and x.strategy not in NO_FUSED_LORA_STRATEGIES:
        moves.append(Fix("fused_lora", "train.fused_lora=null", r(x, fused_lora=None)))
    if x.do_train and x.compile and x.fused_lora is not False and x.peft in ("lora", "pissa") \
            and x.strategy not in NO_FUSED_LORA_STRATEGIES:
        moves.append(Fix("fused_lora", "train.compile=false", r(x, compile=False)))
    unset = " train.offload_layers=null" if x.offload_layers is not None else ""
    if x.do_train and x.offload_activations and x.gradient_checkpointing and x.checkpoint_layers != "auto":
        # under offload, auto keeps, offloads and recomputes layers in the fastest split that fits
        explicit = " train.offload_activations=true" if x.offload_auto else ""  # null is off beside a set split
        moves.append(Fix("ckpt", "let qforge choose the split of kept / offloaded / recomputed layers "
                                 f"(train.checkpoint_layers=auto{unset}{explicit})",
                         r(x, checkpoint_layers="auto", offload_layers=None, offload_auto=False)))
    if x.do_train and x.offload_auto and x.offload_activations:
        # the default split: every layer checkpointed, only the inputs on the host, needs the least GPU memory
        moves.append(Fix("ckpt", "checkpoint all layers, their inputs in host memory (train.offload_activations=true)",
                         r(x, checkpoint_layers=None, offload_layers=None, offload_auto=False)))
    elif x.do_train and (not x.gradient_checkpointing or p.checkpointed < s.layers):
        moves.append(Fix("ckpt", f"checkpoint all layers (train.checkpoint_layers=null{unset})",
                         r(x, gradient_checkpointing=True, checkpoint_layers=None, offload_layers=None)))
    # train.offload_activations is not offered: what it saves on the GPU it needs in host memory on every rank,
    # which the plan cannot see (a login node plans for the compute nodes).
    if x.do_train and x.batch > 1:
        half = max(x.batch // 2, 1)
        accum = x.grad_accum * x.batch // half
        moves.append(Fix("batch", f"batch {half} with grad_accum {accum} (train.batch_size={half} "
                                  f"train.grad_accum={accum})", r(x, batch=half, grad_accum=accum)))
    shardable = x.method in ("none", "fp8", "mxfp4") or (x.method == "bnb" and x.bits == 4)
    if shardable and x.strategy in ("single", "ddp", "zero2"):
        gpus = max(2, x.world * 2)
        moves.append(Fix("gpus", f"strategy=fsdp on {gpus} GPUs (launcher=torchrun launcher.nproc_per_node={gpus} "
                                 "strategy=fsdp)", r(x, strategy="fsdp", world=gpus)))
    elif x.strategy in ("fsdp", "zero3", "zero3_offload") and x.world < 64:
        moves.append(Fix("gpus", f"strategy={x.strategy} on {x.world * 2} GPUs", r(x, world=x.world * 2)))
    if x.method == "none" and x.peft in ("lora", "dora", "oft"):
        moves.append(Fix("quant", "quant=bnb4", r(x, method="bnb", bits=4, double_quant=True)))
    if x.seq > 256:
        moves.append(Fix("seq", f"train.max_seq_len={x.seq // 2}", r(x, seq=x.seq // 2)))
    return moves


def fixes(p: Prediction, x: Inputs, limit: int = 3) -> str:
    """The cheapest single changes that fit, as one clause; else the cheapest combination, or what it needs."""
    if x.target_gib is None:
        return ""
    budget = x.target_gib * GIB * (1 - MARGIN)
    singles = []
    for move in _moves(x, p):
        got = predict_inputs(move.inputs)
        if got.known and got.needed_bytes <= budget:
            singles.append(f"{move.text} ({_g(got.needed_bytes)})")
    if singles:
        return "any one of: " + "; ".join(singles[:limit])
    # Nothing alone: take changes in the same order, each one that still helps, until the run fits.
    current, best = x, p
    chosen: Dict[str, str] = {}  # kind -> the latest move of that kind (insertion order: first applied)
    for _ in range(32):
        step = None
        for move in _moves(current, best):
            got = predict_inputs(move.inputs)
            if got.known and got.needed_bytes < best.needed_bytes * 0.98:
                step = (move, got)
                break
        if step is None:
            break
        current, best = step[0].inputs, step[1]
        chosen[step[0].kind] = step[0].text
        if best.needed_bytes <= budget:
            break
    if not chosen:
        return f"no change qforge can make brings it under {x.target_gib:g} GiB; use GPUs with more memory"
    combo = ", ".join(chosen.values())
    if best.needed_bytes <= budget:
        return f"all of: {combo} ({_g(best.needed_bytes)})"
    return (f"no change fits {x.target_gib:g} GiB: even {combo} needs {_g(best.needed_bytes)} per GPU "
            f"(at {best.peak_phase.name if best.peak_phase else '?'}), so use GPUs with at least "
            f"{math.ceil(best.needed_bytes / GIB / (1 - MARGIN))} GiB")



__all__ = ["CALIBRATION", "ModelShape", "Prediction", "find_shape", "predict", "shape_from_config"]
