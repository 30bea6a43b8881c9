"""OpenChatKit pipeline checkpoints -> a transformers GPT-NeoX model.

OpenChatKit's trainer saves one file per pipeline stage: ``checkpoint_<step>/prank_<stage>_checkpoint.pt``.
Keys are ``<module index>.<name>`` local to the stage: stage 0 starts with ``0.embed_in.weight`` and its layers
follow at ``1.``, ``2.``, ...; later stages number their layers from ``0.``; the last stage ends with a module
holding ``final_layer_norm`` and ``embed_out``. Its own converter (``tools/convert_to_hf_gptneox.py``) needed
``--n-stages`` and ``--n-layer-per-stage`` to match the training script by hand; here both come from the files:
the stages from the ``prank_*`` names, the layers from the key prefixes, and the total is checked against the
config. Input and output embeddings stay untied, as OpenChatKit trained them.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import torch
from loguru import logger
from tqdm import tqdm

_STAGE_FILE = re.compile(r"^prank_(\d+)_checkpoint\.pt$")
# Buffers that old GPT-NeoX layers saved and current ones recompute (transformers dropped them from the state).
_STALE_BUFFERS = ("attention.rotary_emb.inv_freq", "attention.bias", "attention.masked_bias")


class OpenChatKitError(ValueError):
    """Pipeline checkpoints that cannot be assembled; the message names the stage or keys at fault."""


def stage_files(folder: Path) -> list[Path]:
    """The ``prank_<i>_checkpoint.pt`` files of ``folder`` in stage order; a gap names the missing stage."""
    if not folder.is_dir():
        raise OpenChatKitError(f"{folder} is not a folder of OpenChatKit pipeline checkpoints")
    found = {int(m.group(1)): p for p in folder.iterdir() if (m := _STAGE_FILE.match(p.name))}
    if not found:
        raise OpenChatKitError(f"{folder} holds no prank_<stage>_checkpoint.pt files")
    missing = [i for i in range(max(found) + 1) if i not in found]
    if missing:
        names = ", ".join(f"stage {i} (prank_{i}_checkpoint.pt)" for i in missing)
        raise OpenChatKitError(f"{folder} is missing {names}; found stages {sorted(found)}")
    return [found[i] for i in sorted(found)]


def _modules(state: dict[str, torch.Tensor], path: Path) -> list[dict[str, torch.Tensor]]:
    """A stage's keys grouped by their leading module index, in index order."""
    groups: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in state.items():
        index, dot, rest = key.partition(".")
        if not (dot and index.isdigit()):
            raise OpenChatKitError(f"{path.name}: key {key!r} does not start with a module index")
        groups[int(index)][rest] = tensor
    return [groups[i] for i in sorted(groups)]


def gpt_neox_state_dict(folder: Path, head_name: str) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The stages' weights under transformers GPT-NeoX names; also the number of layers in each stage.

    ``head_name`` is the output projection's name in the target model: ``embed_out`` (transformers 4) or
    ``lm_head`` (transformers 5)."""
    state: dict[str, torch.Tensor] = {}
    layers_per_stage = []
    layer = 0
    files = stage_files(folder)
    for path in tqdm(files, desc="stages", unit="stage", disable=len(files) < 2):
        stage = torch.load(path, map_location="cpu", weights_only=True)
        in_stage = 0
        for module in _modules(stage, path):
            if "embed_in.weight" in module:
                state["gpt_neox.embed_in.weight"] = module.pop("embed_in.weight")
            if "final_layer_norm.weight" in module or "embed_out.weight" in module:
                for name in ("weight", "bias"):
                    if f"final_layer_norm.{name}" in module:
                        state[f"gpt_neox.final_layer_norm.{name}"] = module.pop(f"final_layer_norm.{name}")
                    if f"embed_out.{name}" in module:
                        state[f"{head_name}.{name}"] = module.pop(f"embed_out.{name}")
            for key in _STALE_BUFFERS:
                module.pop(key, None)
            if module:  # what is left is one transformer layer
                state.update({f"gpt_neox.layers.{layer}.{k}": v for k, v in module.items()})
                layer, in_stage = layer + 1, in_stage + 1
        layers_per_stage.append(in_stage)
    logger.info("{} stage(s) with {} layers each, {} in all", len(files), layers_per_stage, layer)
    return state, layers_per_stage


def load_openchatkit(folder: Path, config_source: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A GPTNeoXForCausalLM of ``config_source``'s shape holding the pipeline checkpoints' weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_source)
    if config.model_type != "gpt_neox":
        raise OpenChatKitError(f"--config {config_source} is a {config.model_type} model; OpenChatKit trained GPT-NeoX")
    config.tie_word_embeddings = False
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    target = model.state_dict()
    head = "embed_out" if "embed_out.weight" in target else "lm_head"
    state, per_stage = gpt_neox_state_dict(folder, head)
    if sum(per_stage) != config.num_hidden_layers:
        raise OpenChatKitError(
            f"the checkpoints hold {sum(per_stage)} layers ({per_stage} per stage) but --config {config_source} "
            f"has num_hidden_layers={config.num_hidden_layers}"
        )
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    if missing or unexpected:
        raise OpenChatKitError(
            f"the checkpoints do not match --config {config_source}: missing keys {missing or 'none'}; "
            f"unexpected keys {unexpected or 'none'}"
        )
    wrong = [k for k, v in state.items() if v.shape != target[k].shape]
    if wrong:
        shapes = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}" for k in wrong[:5])
        raise OpenChatKitError(f"the checkpoints' shapes do not match --config {config_source}: {shapes}")
    model.load_state_dict(state, strict=True)
    return model.eval()
