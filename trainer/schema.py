"""The structured schema of a run.

Every config group merges onto these dataclasses, so a misspelled key or a wrong type fails at
compose time with Hydra's own message, before any rule runs or torch is imported. Choices that
select behaviour are Enums: a value the code has no branch for cannot be composed at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore


class QuantMethod(str, Enum):
    none = "none"
    bnb = "bnb"
    hqq = "hqq"
    eetq = "eetq"
    gptq = "gptq"
    awq = "awq"
    aqlm = "aqlm"
    fp8 = "fp8"
    mxfp4 = "mxfp4"


class QuantType(str, Enum):
    nf4 = "nf4"
    fp4 = "fp4"


class Dtype(str, Enum):
    auto = "auto"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class PeftMethod(str, Enum):
    lora = "lora"
    dora = "dora"
    oft = "oft"
    pissa = "pissa"
    full = "full"
    freeze = "freeze"


class StrategyName(str, Enum):
    single = "single"
    ddp = "ddp"
    fsdp = "fsdp"
    zero2 = "zero2"
    zero3 = "zero3"
    zero3_offload = "zero3_offload"


class DataFormat(str, Enum):
    alpaca = "alpaca"
    sharegpt = "sharegpt"


class SourceKind(str, Enum):
    auto = "auto"  # an existing file or dir decides; otherwise org/name is a hub id
    file = "file"  # jsonl, json, parquet, csv, arrow
    saved = "saved"  # a directory written by datasets.Dataset.save_to_disk
    hub = "hub"  # a hub dataset id, read from the local Hugging Face cache (never downloaded)


class LoggerName(str, Enum):
    none = "none"
    wandb = "wandb"


class WandbMode(str, Enum):
    auto = "auto"  # online when an API key is configured, offline otherwise
    offline = "offline"
    online = "online"
    disabled = "disabled"


class LauncherName(str, Enum):
    local = "local"
    torchrun = "torchrun"
    slurm = "slurm"


class DeviceMap(str, Enum):
    auto = "auto"


class ModelFamily(str, Enum):
    """Decoder families qforge knows (trainer/families.py); auto: read model_type from a local config.json."""

    auto = "auto"
    llama = "llama"
    mistral = "mistral"
    qwen2 = "qwen2"
    qwen3 = "qwen3"
    gemma2 = "gemma2"
    phi3 = "phi3"
    mixtral = "mixtral"
    gpt_oss = "gpt_oss"
    chatglm = "chatglm"


class Scheduler(str, Enum):
    linear = "linear"
    cosine = "cosine"
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"


class Optimizer(str, Enum):
    """transformers' optimizer names that train here (TPU/NPU-only and research ones left out)."""

    adamw_torch = "adamw_torch"
    adamw_torch_fused = "adamw_torch_fused"
    adafactor = "adafactor"
    sgd = "sgd"
    adagrad = "adagrad"
    rmsprop = "rmsprop"
    # bitsandbytes' optimizers (8-bit states, paged states that spill to host memory)
    adamw_8bit = "adamw_8bit"
    adamw_bnb_8bit = "adamw_bnb_8bit"
    paged_adamw_8bit = "paged_adamw_8bit"
    paged_adamw_32bit = "paged_adamw_32bit"
    lion_8bit = "lion_8bit"
    lion_32bit = "lion_32bit"
    paged_lion_8bit = "paged_lion_8bit"
    paged_lion_32bit = "paged_lion_32bit"
    ademamix = "ademamix"
    ademamix_8bit = "ademamix_8bit"


@dataclass
class TinyArch:
    """Shape of the embedded tiny Llama-architecture model (random weights, built locally)."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    init_seed: int = 0


@dataclass
class ModelConfig:
    preset: str = "tiny"
    # A hub id or a local directory. Null selects the embedded tiny model described by `tiny`.
    name_or_path: Optional[str] = None
    tiny: Optional[TinyArch] = None
    family: ModelFamily = ModelFamily.auto
    adapters: List[str] = field(default_factory=list)
    new_adapter: bool = False
    resize_vocab: bool = False
    device_map: Optional[DeviceMap] = None
    upcast_layernorm: bool = True
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"
    # Liger-kernel RMSNorm/SwiGLU/RoPE kernels. Null: on when CUDA and liger-kernel are available.
    liger: Optional[bool] = None


@dataclass
class QuantConfig:
    method: QuantMethod = QuantMethod.none
    bits: Optional[int] = None
    quant_type: QuantType = QuantType.nf4
    double_quant: bool = True
    compute_dtype: Dtype = Dtype.auto
    group_size: int = 64


@dataclass
class PeftConfig:
    method: PeftMethod = PeftMethod.lora
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])
    use_rslora: bool = False
    oft_block_size: int = 0
    # freeze: the last N decoder layers are trained, the rest frozen.
    freeze_trainable_layers: int = 2
    pissa_iters: int = 16


@dataclass
class StrategyConfig:
    name: StrategyName = StrategyName.single
    version: int = 2  # FSDP version: 2 is torch's fully_shard, 1 the wrapper class
    offload_optimizer: bool = False
    offload_params: bool = False


@dataclass
class DataSource:
    """One entry of a mixture (data.sources). Unset fields take the data.* value of the same name."""

    path: str = "???"
    format: Optional[DataFormat] = None
    kind: SourceKind = SourceKind.auto
    # A hub dataset's config name (load_dataset's `name`).
    subset: Optional[str] = None
    split: Optional[str] = None
    weight: float = 1.0
    max_samples: Optional[int] = None
    # qforge's field name -> this source's column name, e.g. {instruction: prompt, output: completion}.
    columns: Optional[Dict[str, str]] = None


@dataclass
class DataConfig:
    format: DataFormat = DataFormat.alpaca
    # One source (path, kind, subset, split, columns) or a mixture (sources); exactly one is set.
    path: Optional[str] = "???"
    kind: SourceKind = SourceKind.auto
    subset: Optional[str] = None
    split: str = "train"
    columns: Dict[str, str] = field(default_factory=dict)
    sources: List[DataSource] = field(default_factory=list)
    # auto: the tokenizer's own chat_template (the Alpaca prompt for a tokenizer without one); or alpaca,
    # chatml, llama3, qwen2, mistral; or the path of a Jinja file.
    template: str = "auto"
    eval_fraction: float = 0.1
    max_samples: Optional[int] = None
    # Seeds the eval split and the mixture's sampling.
    split_seed: int = 0
    # Tokenize on the fly from an iterable dataset (for data larger than RAM); needs train.max_steps.
    streaming: bool = False
    # Where tokenized data is cached; null: <output_root>/.data_cache.
    cache_dir: Optional[str] = None
    # Tokenizer worker processes; null: one process using the tokenizer's own threads on every core.
    num_proc: Optional[int] = None


@dataclass
class LoggerConfig:
    name: LoggerName = LoggerName.none
    project: str = "qforge"
    entity: Optional[str] = None
    group: Optional[str] = None
    mode: WandbMode = WandbMode.auto
    tags: List[str] = field(default_factory=list)


@dataclass
class SlurmConfig:
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time: str = "04:00:00"
    nodes: int = 1
    gpus_per_node: int = 1
    cpus_per_task: int = 8
    mem: Optional[str] = None
    constraint: Optional[str] = None
    signal: str = "USR2@120"  # sent to the batch script this long before the end; it checkpoints and requeues
    extra: List[str] = field(default_factory=list)  # more sbatch options, e.g. ["--exclusive", "--reservation=x"]
    setup: List[str] = field(default_factory=list)  # shell lines run before training (module load, source venv)
    strict: bool = False  # a sweep with any illegal combination submits nothing
    wait: bool = False  # block until every job has ended (and exit non-zero if one failed)
    report_job: bool = True  # after a sweep, a small job writes the sweep report (trainer/report.py)
    job_name: str = "qforge"
    # Memory of one of the job's GPUs in GiB: the memory rule refuses what cannot fit (trainer/memory.py).
    gpu_mem_gib: Optional[float] = None


@dataclass
class LauncherConfig:
    name: LauncherName = LauncherName.local
    nproc_per_node: str = "auto"
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: Optional[str] = None
    rdzv_id: Optional[str] = None
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


@dataclass
class TrainLoop:
    max_steps: int = -1
    num_epochs: float = 1.0
    batch_size: int = 4
    eval_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    scheduler: Scheduler = Scheduler.cosine
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_seq_len: int = 512
    gradient_checkpointing: bool = True
    # Null: every decoder layer is checkpointed; N: only the first N (memory buys back recompute), or with
    # offload_activations N spread through the stack; auto: the fewest that fit the GPU with a 10% margin
    # (with offload_activations: with offload_layers, the fastest split of kept / offloaded / checkpointed layers
    # that fits GPU and host memory), decided at plan time (trainer/memory). Any, because a structured
    # config has no Union: the rule train.checkpoint_layers refuses every other value.
    checkpoint_layers: Any = None
    # What the decoder layers keep for backward lives in pinned host memory instead of GPU memory, copied on a
    # side stream and brought back one layer ahead during backward (trainer/offload.py): a checkpointed layer's
    # input, all of an un-checkpointed layer's saved activations (no recompute). Needs CUDA. Null: on by default
    # where it was measured to pay and fits (one CUDA process, train.checkpoint_layers null, a step of at least
    # 2**25 tokens x hidden, the pinned bytes within the host's share, no more GPU memory than without it), with half
    # the layers offloaded whole and half checkpointed (trainer/memory offload_default_reason); false: off.
    offload_activations: Optional[bool] = None
    # With offload_activations: how many of the un-checkpointed layers move everything they save to the host; the
    # others (spread among them) keep it on the GPU, with neither copies nor recompute. Null: all of them,
    # or, with checkpoint_layers=auto, the memory model's choice (as many kept as fit, then offloaded, then
    # checkpointed). Any for the same reason as checkpoint_layers: the rule train.offload_layers checks it.
    offload_layers: Any = None
    # The frozen input embedding table in pinned host memory, read by the GPU row by row over the host link
    # (trainer/host_embeddings.py): the same lookups, the table's GPU memory freed (0.98 GiB for Llama-3-8B).
    # Null: wherever it applies (CUDA, strategy=single, a frozen table not tied to lm_head); true: refused where it
    # does not; false: the table stays on the GPU.
    embeddings_on_host: Optional[bool] = None
    # Host memory of one node in GiB, against which the pinned memory of offload_activations is checked (every
    # process of the node keeps its own). Null: what this machine has available; a Slurm job's is not known.
    host_mem_gib: Optional[float] = None
    # Memory of one GPU in GiB, for the memory rule where it cannot be detected (a login node) or to
    # check against a smaller GPU. Null: this machine's GPUs (none: no check), or launcher.slurm.gpu_mem_gib.
    gpu_mem_gib: Optional[float] = None
    # Pack short examples into rows of max_seq_len tokens; attention never crosses examples.
    packing: bool = True
    # Chunked lm_head + cross-entropy: no full fp32 logits (same loss value).
    fused_ce: bool = True
    # LoRA branch as one autograd function: dropout mask redrawn in backward, not stored; norm outputs and
    # the SwiGLU product recomputed (same result, less memory). Null: on where a step has enough work
    # (batch x seq x hidden >= 2**25, e.g. an 8B model at 8k tokens), where it measured faster.
    fused_lora: Optional[bool] = None
    # Each decoder layer's training forward through torch.compile, one compiled graph for all layers
    # (trainer/compile_layers.py); the first step pays the compile, kept in ~/.cache/qforge/torchinductor for the
    # next run. Takes peft's LoRA forward (fused_lora=null resolves to off). single and ddp only.
    compile: bool = False
    logging_steps: int = 5
    eval_steps: int = 50
    save_steps: int = 50
    save_total_limit: int = 2
    optim: Optimizer = Optimizer.adamw_torch
    resume: str = "auto"
    # More TrainerCallbacks, as "module:function" factories called with the RunPlan (e.g. early stopping,
    # a custom evaluation); each returns a transformers.TrainerCallback.
    callbacks: List[str] = field(default_factory=list)


@dataclass
class EvalConfig:
    """What a person reads after a run: eval.samples held-out prompts answered before and after training."""

    samples: int = 0  # 0: none; N: samples.md with N generations (greedy) next to the reference answers
    max_new_tokens: int = 128


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    train: TrainLoop = field(default_factory=TrainLoop)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dry_run: bool = False
    do_train: bool = True
    do_eval: bool = True
    seed: int = 42
    output_root: str = "outputs"
    # Null: a fresh, unique dir under output_root. Set it to resume or to name a run yourself.
    run_dir: Optional[str] = None
    run_name: Optional[str] = None


def register_schema() -> None:
    """Put the schema where conf/train.yaml's defaults list finds it (`- run_schema`)."""
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
