"""Turn a fine-tuned checkpoint into a registry version, gate it against the served model, and publish it.

    python training/convert.py --run <run-name> --name wiki-chat [--dtype bf16] [--publish 127.0.0.1:50051]
    python training/convert.py --checkpoint <storage>/<run>/checkpoint_000004 --name wiki-chat
    python training/convert.py --hf path/to/folder | --gguf model.gguf --name my-model
    python training/convert.py --gguf model.gguf --name my-model --dequantize   (safetensors, not the GGUF file)
    python training/convert.py --run <run-name> --name wiki-chat --to-gguf q4_1   (also a GGUF for --runner llamacpp)
    python training/convert.py --openchatkit path/to/checkpoint_100 --config <HF folder|hub id> --name ock-3b
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python training/convert.py --run <run> ...

The story of a conversion: read the source into a float32 model (a run through its ``final.json``, a
checkpoint's ``hf/`` export or its ``train_state.pt`` with a LoRA adapter merged into its base, a Hugging Face
folder or adapter, a GGUF file, or OpenChatKit pipeline stages); note its logits on fixed prompts; write it in
``--dtype`` as safetensors (sharded above ``--max-shard-size``) with its tokenizer and generation config into a
scratch folder beside the registry; load that folder with the serving loader and check its logits are finite
and equal the source's within the dtype's tolerance, and that a short generation runs; run the evaluation gate
(``training/gate.py``) against the served or latest version; then rename the folder into the registry as the
next immutable version, with the source, step, eval loss, parent, gate numbers and every file's sha256 in its
metadata; with ``--publish``, load it into a running generation service (ModelAdmin/LoadVersion).

A GGUF source (``--gguf``) is kept as it is: copied byte for byte as ``model.gguf`` (its sha256 in the metadata
like every file's, its GGUF type as the version's dtype, e.g. ``gguf:q4_1``) beside the tokenizer and config
transformers reads from it, so the folder describes itself; llama.cpp must load it with finite logits (when
llama-cpp-python is installed) and the serving loader must load it as a .gguf path (de-quantized) with the
source's logits, or nothing is published. ``--dequantize`` stores de-quantized safetensors instead, as before.
``--to-gguf TYPE`` adds to any other source's version a ``model.gguf`` made from the written safetensors by
llama.cpp's converter and quantizer (training/gguf.py; ``--gguf-pre-tokenizer`` for a BPE tokenizer the converter
does not recognise), checked the same way in llama.cpp, so one version serves on both runners.

Any failure before the rename (a bad source, a mismatch, a full disk, a refusing gate) publishes nothing and
removes the scratch folder. Exit codes: 0 published, 1 refused by the gate or by the service, 2 bad input.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python training/convert.py` (how `ray job submit` runs it)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from loguru import logger
from safetensors import SafetensorError
from tqdm import tqdm

from services.common.errors import ServiceError
from services.common.logs import setup_logging
from services.common.paths import VarLayout
from services.common.registry import METADATA_FILE, ModelRegistry, RegistryVersion
from services.generation.loading import LoadedModel, guess_prompt_format, load_model
from training.checkpoints import HF_FOLDER, CheckpointNotFound, read_final, read_training_state
from training.gate import GateError, GateResult, decide, evaluate_model, read_questions
from training.gguf import GGUF_TYPES, GGUFError, check_loads, gguf_metadata, hf_to_gguf
from training.openchatkit import OpenChatKitError, load_openchatkit

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LOADER_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# Largest |logit difference| / max |source logit| the stored weights may show: float32 reorders sums only;
# fp16 keeps 10 mantissa bits, bf16 7 (relative rounding 2^-11, 2^-8), compounded over the layers.
TOLERANCES = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
CHECK_PROMPTS = ["<human>: Where is Zurich?\n<bot>:", "The quick brown fox jumps over the lazy dog."]
CHECK_NEW_TOKENS = 4
GGUF_FILE = "model.gguf"  # a version's GGUF, for the llama.cpp runner (RegistryVersion.gguf_path finds it)


class ConversionError(ValueError):
    """A source that cannot be converted, or a converted model that fails validation."""


@dataclass
class Source:
    """The model to convert, in float32, and what is known about where it came from."""

    model: Any
    tokenizer: Any
    description: str  # run:<name>, checkpoint:<path>, hf:<path>, gguf:<path>, openchatkit:<path>
    training: dict[str, Any] = field(default_factory=dict)  # run, checkpoint, step, eval_loss
    parent: str = ""
    eval_data: str = ""
    gguf: Path | None = None  # a GGUF source kept as it is


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python training/convert.py",
        description="Convert a checkpoint into a validated registry version, gate it against the served model, "
        "and optionally publish it to a running generation service.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("source (exactly one)").add_mutually_exclusive_group(required=True)
    g.add_argument("--run", help="a finished finetune run by name (reads <storage>/<run>/final.json)")
    g.add_argument("--checkpoint", help="a checkpoint_* folder of a run (its hf/ export or train_state.pt)")
    g.add_argument("--hf", help="a Hugging Face model folder, or a PEFT adapter folder (merged into its base)")
    g.add_argument(
        "--gguf",
        help="a .gguf file: kept byte for byte as model.gguf (checked to load in llama.cpp) with the tokenizer and "
        "config transformers reads from it; see --dequantize",
    )
    g.add_argument("--openchatkit", help="an OpenChatKit checkpoint_<step> folder of prank_<stage>_checkpoint.pt")
    p.add_argument(
        "--config",
        default="",
        help="model config (HF folder or hub id): required for --openchatkit; for --checkpoint, overrides the run's",
    )
    g = p.add_argument_group("output")
    g.add_argument("--name", required=True, help="registry model name (lower-case letters, digits, . _ -)")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the stored weights")
    g.add_argument("--max-shard-size", default="2GB", help="safetensors files are split above this size")
    g.add_argument(
        "--dequantize",
        action="store_true",
        help="with --gguf: store de-quantized safetensors in --dtype instead of the GGUF file",
    )
    g.add_argument(
        "--to-gguf",
        default="",
        choices=["", *GGUF_TYPES],
        metavar="TYPE",
        help=f"also write model.gguf of this type ({', '.join(GGUF_TYPES)}) beside the safetensors, made by "
        "llama.cpp's converter and quantizer (needs `make llamacpp`), so the version serves on --runner llamacpp "
        "too; not for a kept --gguf file",
    )
    g.add_argument(
        "--gguf-pre-tokenizer",
        default="",
        metavar="NAME",
        help="with --to-gguf: the llama.cpp pre-tokenizer for a BPE tokenizer whose hash its converter does not "
        "know (gpt-2 for a byte-level BPE with GPT-2's split rule); a known tokenizer keeps its own",
    )
    g.add_argument(
        "--prompt-format",
        choices=["", "chat_template", "openchatkit"],
        default="",
        help="prompt format recorded in the version (default: the tokenizer's chat template if it has one)",
    )
    g.add_argument("--notes", default="", help="free text stored in the version's metadata")
    g.add_argument("--var-dir", default=None, help="runtime folder holding the registry; env NIGHTCAP_VAR")
    g.add_argument(
        "--storage-path", default=None, help="the finetune's Ray storage (for --run); default var/ray/storage"
    )
    g = p.add_argument_group("evaluation gate")
    g.add_argument("--eval-data", default="", help="held-out chat JSONL (default: the run's --eval-data)")
    g.add_argument("--questions", default="", help="JSONL of {question, expected: [words]} answered by each model")
    g.add_argument(
        "--baseline",
        default="",
        help="registry name[:version] to compare with (default: the version --publish serves, else the newest "
        "version of --name, else the run's base model)",
    )
    g.add_argument("--max-regression", type=float, default=0.02, help="allowed relative perplexity increase")
    g.add_argument("--seq-length", type=int, default=512, help="tokens per evaluation row")
    g.add_argument("--force", action="store_true", help="publish even if the gate refuses (recorded as forced)")
    g = p.add_argument_group("publishing")
    g.add_argument("--publish", default="", help="generation service host:port to load the new version into")
    g.add_argument("--in-place", action="store_true", help="swap in place (one copy in memory; requests wait)")
    return p


# ---------------------------------------------------------------------------------------------- reading sources


def read_source(args: argparse.Namespace, var: VarLayout) -> Source:
    if args.run:
        storage = Path(args.storage_path) if args.storage_path else var.root / "ray" / "storage"
        record = read_final(storage, args.run)
        folder = Path(record.hf_folder)
        if not folder.is_dir():
            raise CheckpointNotFound(f"run {args.run!r} names {folder} as its final weights, but it does not exist")
        model, tokenizer = _from_hf(folder)
        training = {"run": record.run_name, "checkpoint": record.checkpoint}
        training.update({k: record.metrics[k] for k in ("step", "eval_loss", "loss") if k in record.metrics})
        return Source(
            model, tokenizer, f"run:{record.run_name}", training, _parent_of(record.model_source), record.eval_data
        )
    if args.checkpoint:
        return _read_checkpoint(Path(args.checkpoint), args.config)
    if args.hf:
        folder = Path(args.hf)
        if not folder.is_dir():
            raise CheckpointNotFound(f"--hf {folder} is not a folder")
        if (folder / "adapter_config.json").is_file():
            model, tokenizer, base = _merge_adapter(folder)
            return Source(model, tokenizer, f"hf-adapter:{folder.resolve()}", parent=_parent_of(base))
        model, tokenizer = _from_hf(folder)
        return Source(model, tokenizer, f"hf:{folder.resolve()}", parent=_parent_of(str(folder)))
    if args.gguf:
        return _read_gguf(Path(args.gguf), keep=not args.dequantize)
    if not args.config:
        raise ConversionError("--openchatkit needs --config: the HF folder or hub id of the model's shape")
    from transformers import AutoTokenizer

    folder = Path(args.openchatkit)
    model = load_openchatkit(folder, args.config)
    tokenizer = AutoTokenizer.from_pretrained(args.config)
    step = folder.name.removeprefix("checkpoint_")
    training = {"checkpoint": str(folder.resolve()), **({"step": int(step)} if step.isdigit() else {})}
    return Source(model, tokenizer, f"openchatkit:{folder.resolve()}", training)


def _from_hf(folder: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, SafetensorError) as error:
        raise ConversionError(f"cannot read a causal LM from {folder}: {error}") from None
    return model.eval(), tokenizer


def _read_checkpoint(folder: Path, config_override: str) -> Source:
    """A run's checkpoint: its ``hf/`` export (final checkpoints), else the full state in train_state.pt."""
    if not folder.is_dir():
        raise CheckpointNotFound(f"--checkpoint {folder} is not a folder")
    training: dict[str, Any] = {"checkpoint": str(folder.resolve())}
    if folder.name.startswith("checkpoint_") and folder.name.removeprefix("checkpoint_").isdigit():
        training["step"] = int(folder.name.removeprefix("checkpoint_"))
    if (folder / HF_FOLDER).is_dir() and not config_override:
        model, tokenizer = _from_hf(folder / HF_FOLDER)
        return Source(model, tokenizer, f"checkpoint:{folder.resolve()}", training)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    state = read_training_state(folder)
    training["step"] = state.step
    base = config_override or state.config["model_source"]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if state.config.get("lora"):
        from peft import LoraConfig, get_peft_model

        targets = state.config["lora_targets"]
        model = get_peft_model(
            model,
            LoraConfig(
                r=state.config["lora_rank"],
                lora_alpha=state.config["lora_alpha"],
                lora_dropout=state.config["lora_dropout"],
                target_modules=targets if targets == "all-linear" else targets.split(","),
                task_type="CAUSAL_LM",
            ),
        )
    _load_exactly(model, state.model_state, base)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return Source(
        model.eval(), AutoTokenizer.from_pretrained(base), f"checkpoint:{folder.resolve()}", training, _parent_of(base)
    )


def _load_exactly(model: Any, state: dict[str, torch.Tensor], config: str) -> None:
    target = model.state_dict()
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    # transformers drops a tied output head from saved states; it is rebuilt from the input embeddings.
    tied = {k for k in missing if k.endswith("lm_head.weight") and model.config.tie_word_embeddings}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ConversionError(
            f"the checkpoint does not match the model of {config}: missing keys {missing[:20] or 'none'}; "
            f"unexpected keys {unexpected[:20] or 'none'}"
        )
    wrong = [k for k in state if state[k].shape != target[k].shape]
    if wrong:
        raise ConversionError(f"the checkpoint's shapes do not match {config}: {wrong[:10]}")
    model.load_state_dict(state, strict=False)


def _merge_adapter(folder: Path) -> tuple[Any, Any, str]:
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    model = AutoPeftModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    base = model.peft_config["default"].base_model_name_or_path
    tokenizer_source = folder if (folder / "tokenizer_config.json").is_file() else base
    return model.merge_and_unload().eval(), AutoTokenizer.from_pretrained(tokenizer_source), base


def _read_gguf(path: Path, keep: bool = True) -> Source:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.is_file() or path.suffix != ".gguf":
        raise CheckpointNotFound(f"--gguf {path} is not a .gguf file")
    if keep:  # before transformers reads it: the file is served by llama.cpp as it is
        check_llama_cpp_loads(path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # transformers refuses to save a model loaded from GGUF ("quantized with gguf and is not serializable");
    # its weights are already de-quantized, so dropping the quantizer lets it save.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return Source(model.eval(), tokenizer, f"gguf:{path.resolve()}", gguf=path if keep else None)


def check_llama_cpp_loads(path: Path, tokenizer: Any = None) -> None:
    """Guarantees that llama.cpp loads every tensor of ``path`` and, given the tokenizer, that its logits after
    the first check prompt are finite; skipped with a warning when llama-cpp-python is not installed."""
    if importlib.util.find_spec("llama_cpp") is None:
        logger.warning("llama-cpp-python is not installed (make llamacpp): {} is not checked in llama.cpp", path)
        return
    ids = tokenizer(CHECK_PROMPTS[0])["input_ids"] if tokenizer is not None else None
    try:
        found = check_loads(path, ids)
    except GGUFError as error:
        raise ConversionError(str(error)) from None
    if ids and not found["finite"]:
        raise ConversionError(f"llama.cpp's logits for {path.name} are not finite on {CHECK_PROMPTS[0]!r}")
    logger.info("llama.cpp loads {}: {}", path.name, found["description"])


def _parent_of(model_source: str) -> str:
    """name:version when the model came from a registry version (its folder holds nightcap.json)."""
    meta = Path(model_source) / METADATA_FILE
    if not meta.is_file():
        return ""
    import json

    raw = json.loads(meta.read_text())
    return f"{raw.get('name', '')}:{raw.get('version', '')}"


# ------------------------------------------------------------------------------------------- write and validate


@torch.no_grad()
def reference_logits(model: Any, tokenizer: Any) -> list[torch.Tensor]:
    return [model(input_ids=_ids(tokenizer, p)).logits[0].float() for p in CHECK_PROMPTS]


def _ids(tokenizer: Any, prompt: str) -> torch.Tensor:
    return torch.tensor([tokenizer(prompt)["input_ids"]])


def write_candidate(source: Source, folder: Path, dtype: str, max_shard_size: str) -> None:
    """``folder`` holds the weights (safetensors in ``dtype``, or a kept GGUF file byte for byte as it came),
    the tokenizer and the config: a folder transformers and the serving loader read as they are."""
    if source.gguf is not None:
        shutil.copyfile(source.gguf, folder / GGUF_FILE)
        source.model.config.save_pretrained(folder)  # the config transformers read from the GGUF
        source.tokenizer.save_pretrained(folder)
        return
    source.model.to(DTYPES[dtype])
    source.model.save_pretrained(folder, max_shard_size=max_shard_size)
    source.tokenizer.save_pretrained(folder)


def write_gguf(folder: Path, gguf_type: str, pre_tokenizer: str, tokenizer: Any) -> None:
    """``model.gguf`` beside the safetensors in ``folder``, made by llama.cpp's converter and quantizer, and
    checked to load in llama.cpp with finite logits."""
    try:
        hf_to_gguf(folder, folder / GGUF_FILE, gguf_type, pre_tokenizer)
    except GGUFError as error:
        raise ConversionError(str(error)) from None
    check_llama_cpp_loads(folder / GGUF_FILE, tokenizer)


def stored_dtype(source: Source, folder: Path, dtype: str) -> str:
    """The metadata's dtype: the safetensors' torch dtype, or ``gguf:<type>`` for a kept GGUF file."""
    if source.gguf is None:
        return LOADER_DTYPES[dtype]
    file_type = gguf_metadata(folder / GGUF_FILE)["file_type"]
    return "gguf:" + file_type.removeprefix("MOSTLY_").removeprefix("ALL_").lower()


@torch.no_grad()
def validate(folder: Path, reference: list[torch.Tensor], dtype: str, registry: ModelRegistry, prompt_format: str):
    """Loads ``folder`` with the serving loader (a kept GGUF as a .gguf path: de-quantized by transformers);
    its logits must be finite and match the source's."""
    kept = folder / GGUF_FILE
    served = kept if kept.is_file() and not any(folder.glob("*.safetensors")) else folder
    loaded = load_model(str(served), registry, "cpu", LOADER_DTYPES[dtype], prompt_format)
    worst = 0.0
    for prompt, expected in zip(CHECK_PROMPTS, reference, strict=True):
        logits = loaded.model(input_ids=_ids(loaded.tokenizer, prompt)).logits[0].float()
        if not torch.isfinite(logits).all():
            raise ConversionError(f"the converted model gives non-finite logits on {prompt!r}")
        scale = max(float(expected.abs().max()), 1.0)
        worst = max(worst, float((logits - expected).abs().max()) / scale)
    if worst > TOLERANCES[dtype]:
        raise ConversionError(
            f"the converted model's logits differ from the source's by {worst:.2e} (relative), above the "
            f"{dtype} tolerance {TOLERANCES[dtype]:.0e}"
        )
    ids = _ids(loaded.tokenizer, CHECK_PROMPTS[0])
    generated = loaded.model.generate(
        ids, max_new_tokens=CHECK_NEW_TOKENS, min_new_tokens=CHECK_NEW_TOKENS, do_sample=False
    )
    if generated.shape[1] != ids.shape[1] + CHECK_NEW_TOKENS:
        raise ConversionError("the converted model did not generate a short continuation")
    logger.info(
        "validated: logits within {:.1e} of the source (tolerance {:.0e}); generation ran", worst, TOLERANCES[dtype]
    )
    return loaded


# ------------------------------------------------------------------------------------------------- the gate


def choose_baseline(args: argparse.Namespace, registry: ModelRegistry, source: Source) -> str:
    if args.baseline:
        return args.baseline
    if args.publish:
        from clients.admin import ModelAdminClient

        with ModelAdminClient(args.publish) as admin:
            served = admin.active().model
        if ":" in served:
            return served
    if registry.versions(args.name):
        return args.name
    return source.parent


def run_gate(
    args: argparse.Namespace, candidate: LoadedModel, source: Source, registry: ModelRegistry
) -> GateResult | None:
    eval_data = args.eval_data or source.eval_data
    if not eval_data:
        logger.warning("no --eval-data (and the run recorded none): the evaluation gate is skipped")
        return None
    if not Path(eval_data).is_file():
        raise GateError(f"eval data {eval_data} does not exist")
    baseline_spec = choose_baseline(args, registry, source)
    if not baseline_spec:
        logger.warning("nothing to compare with (no served, registered or parent version): the gate is skipped")
        return None
    questions = read_questions(Path(args.questions)) if args.questions else None
    logger.info("gate: candidate vs {} on {}", baseline_spec, eval_data)
    baseline = load_model(baseline_spec, registry, "cpu", "float32")
    baseline_label = f"{baseline.name}:{baseline.version}" if baseline.version else baseline.name
    baseline_metrics = evaluate_model(baseline, Path(eval_data), args.seq_length, questions)
    del baseline
    candidate_metrics = evaluate_model(candidate, Path(eval_data), args.seq_length, questions)
    return decide(candidate_metrics, baseline_metrics, baseline_label, args.max_regression, args.force)


# --------------------------------------------------------------------------------------------------- driver


def convert(args: argparse.Namespace) -> tuple[RegistryVersion | None, GateResult | None]:
    """Everything up to the registry: (the new version or None if the gate refused, the gate's result)."""
    var = VarLayout.from_env(args.var_dir)
    registry = ModelRegistry(var.models)
    steps = tqdm(total=5, desc="convert", unit="step", disable=not sys.stderr.isatty())
    started = time.perf_counter()
    source = read_source(args, var)
    steps.update()
    reference = reference_logits(source.model, source.tokenizer)
    registry.root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".converting-{args.name}-", dir=registry.root))
    try:
        write_candidate(source, scratch, args.dtype, args.max_shard_size)
        if source.gguf is not None:
            if args.to_gguf:
                logger.warning("--to-gguf is ignored: the --gguf file is kept as it is (--dequantize converts it)")
            check_llama_cpp_loads(scratch / GGUF_FILE, source.tokenizer)
        elif args.to_gguf:
            write_gguf(scratch, args.to_gguf, args.gguf_pre_tokenizer, source.tokenizer)
        steps.update()
        prompt_format = args.prompt_format or guess_prompt_format(source.tokenizer)
        del source.model  # the candidate is loaded back below; one copy is enough
        candidate = validate(scratch, reference, args.dtype, registry, prompt_format)
        steps.update()
        gate = run_gate(args, candidate, source, registry)
        steps.update()
        if gate is not None:
            print(gate.table())
            if gate.decision == "refused":
                logger.warning("the gate refused the candidate; nothing is published (--force overrides)")
                return None, gate
        version = registry.publish_version(
            args.name,
            scratch,
            prompt_format=prompt_format,
            source=source.description,
            metrics={k: v for k, v in source.training.items() if isinstance(v, int | float)},
            notes=args.notes,
            move=True,
            dtype=stored_dtype(source, scratch, args.dtype),
            parent=source.parent,
            training=source.training,
            gate=gate.as_metadata() if gate else {"decision": "skipped"},
        )
        steps.update()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        steps.close()
    logger.info("published {} at {} in {:.1f}s", version.metadata.spec, version.path, time.perf_counter() - started)
    return version, gate


def publish(address: str, spec: str, in_place: bool) -> None:
    from clients.admin import ModelAdminClient

    with ModelAdminClient(address) as admin:
        for step in admin.publish(spec, in_place=in_place):
            logger.info("{}: {:>3.0%} {} {}", address, step.fraction, step.stage, step.message)


def main(argv: list[str] | None = None) -> int:
    setup_logging("training")
    args = build_parser().parse_args(argv)
    try:
        version, _ = convert(args)
    except (ConversionError, CheckpointNotFound, OpenChatKitError, GateError, ServiceError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a full disk, a permission: nothing was published
        print(f"error: conversion failed and published nothing: {error}", file=sys.stderr)
        return 2
    if version is None:
        return 1
    print(f"published {version.metadata.spec} at {version.path}")
    try:
        _record_wandb_artifact(args, version)
    except Exception as error:  # the version is published; a logging backend must not turn that into a failure
        logger.warning("could not record {} as a W&B artifact: {}", version.metadata.spec, error)
    if args.publish:
        from clients.client import NightcapError

        try:
            publish(args.publish, version.metadata.spec, args.in_place)
        except NightcapError as error:
            print(f"error: {args.publish} refused {version.metadata.spec}: {error}", file=sys.stderr)
            return 1
        print(f"{args.publish} now serves {version.metadata.spec}")
    return 0


def _record_wandb_artifact(args: argparse.Namespace, version: RegistryVersion) -> None:
    """Where the run logged to W&B (its wandb/ folder exists), the version becomes an artifact of it."""
    if not args.run:
        return
    log_dir = VarLayout.from_env(args.var_dir).logs / "training" / args.run
    if not (log_dir / "wandb").is_dir():
        return
    import wandb

    run = wandb.init(
        project="nightcap",
        name=f"convert-{args.run}",
        job_type="convert",
        mode="online" if os.environ.get("WANDB_API_KEY") else "offline",
        dir=str(log_dir),
    )
    artifact = wandb.Artifact(version.metadata.name, type="model", metadata={"version": version.metadata.version})
    artifact.add_reference(f"file://{version.path}", checksum=False)
    run.log_artifact(artifact, aliases=[f"v{version.metadata.version}"])
    run.finish()


if __name__ == "__main__":
    sys.exit(main())
