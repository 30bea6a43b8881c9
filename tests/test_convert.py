"""training/convert.py: checkpoints of every kind become registry versions whose logits equal the source's;
bad sources publish nothing; the evaluation gate refuses a worse model and accepts a fine-tuned one."""

from __future__ import annotations

import errno
import sys
from pathlib import Path

import pytest
import torch
from conftest import train_tiny_tokenizer
from loguru import logger
from safetensors import safe_open
from test_training import city_chats, write_jsonl

from services.common.logs import FORMAT
from services.common.registry import ModelRegistry
from services.generation.loading import load_model
from training import convert, finetune
from training.checkpoints import HF_FOLDER, FinalRecord, export_hf, load_checkpoint, save_checkpoint, write_final
from training.data import load_packed
from training.model import build_model, build_optimizer, token_loss
from training.openchatkit import OpenChatKitError, stage_files
from training.session import Session

PROMPT = "<human>: Where is Zurich?\n<bot>: Zurich is"


@pytest.fixture(autouse=True)
def loguru_follows_pytest_capture():
    """convert.main points loguru at the sys.stderr of its test (a capture pytest closes after it): afterwards,
    log to whatever sys.stderr is at the time of each message, so later tests' logs do not hit a closed stream."""
    yield
    logger.remove()
    logger.add(lambda message: sys.stderr.write(message), format=FORMAT)


def logits_of(model, tokenizer, prompt: str = PROMPT) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokenizer(prompt)["input_ids"]])).logits[0].float()


def registry_logits(var: Path, spec: str) -> torch.Tensor:
    loaded = load_model(spec, ModelRegistry(var / "models"))
    return logits_of(loaded.model, loaded.tokenizer)


def fine_tune_steps(tiny_model_dir: Path, data: Path, tmp_path: Path, steps: int, lora: bool = False, lr="3e-3"):
    """A few real optimizer steps with the finetune's model and optimizer.

    Returns (config, model, plain model, tokenizer, optimizer, scheduler)."""
    argv = ["--model", str(tiny_model_dir), "--data", str(data), "--total-steps", str(steps), "--lr", lr]
    argv += ["--batch-size", "4", "--seq-length", "64", "--var-dir", str(tmp_path), "--warmup-steps", "0"]
    _, config, packed, _ = finetune.build_run([*argv, *(["--lora"] if lora else [])])
    model, plain, tokenizer = build_model(config, Session(False))
    optimizer, scheduler = build_optimizer(config, model)
    for step in range(steps):
        rows = packed.order[step * 4 : (step + 1) * 4]
        loss, count = token_loss(
            model, torch.tensor(packed.train.input_ids[rows]), torch.tensor(packed.train.labels[rows])
        )
        (loss / count).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return config, model.eval(), plain, tokenizer, optimizer, scheduler


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("chats")
    return write_jsonl(folder / "train.jsonl", city_chats(40)), write_jsonl(folder / "eval.jsonl", city_chats(8, 3))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_training_checkpoint_becomes_a_version_with_the_checkpoints_logits(lora, tiny_model_dir, chats, tmp_path):
    config, model, _, tokenizer, optimizer, scheduler = fine_tune_steps(tiny_model_dir, chats[0], tmp_path, 2, lora)
    checkpoint = tmp_path / "storage" / "run" / "checkpoint_000002"
    checkpoint.mkdir(parents=True)
    save_checkpoint(checkpoint, model, optimizer, scheduler, 2, config)  # no hf/: an intermediate checkpoint
    expected = logits_of(model, tokenizer)
    assert not torch.allclose(expected, logits_of(load_model(str(tiny_model_dir), None).model, tokenizer))

    var = tmp_path / "var"
    assert convert.main(["--checkpoint", str(checkpoint), "--name", "tuned", "--var-dir", str(var)]) == 0

    torch.testing.assert_close(registry_logits(var, "tuned:1"), expected, atol=1e-4, rtol=1e-4)
    meta = ModelRegistry(var / "models").resolve("tuned:1").metadata
    assert meta.training["step"] == 2 and meta.source.startswith("checkpoint:")
    assert set(meta.files) >= {"config.json", "model.safetensors", "tokenizer.json"}


def test_a_resumed_fp16_run_keeps_its_loss_scale(tiny_model_dir, chats, tmp_path):
    config, model, _, _, optimizer, scheduler = fine_tune_steps(tiny_model_dir, chats[0], tmp_path, 1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.tensor(1.0))  # makes its scale tensor
    scaler.update(2.0**11)  # where five overflowing fp16 steps would have halved it to
    saved = tmp_path / "fp16"
    saved.mkdir()
    save_checkpoint(saved, model, optimizer, scheduler, 1, config, scaler)

    resumed = torch.amp.GradScaler("cpu")  # a new worker's scaler starts at 65536
    assert load_checkpoint(saved, model, optimizer, scheduler, resumed) == 1
    assert resumed.get_scale() == 2.0**11

    bf16 = tmp_path / "bf16"  # its scaler is off: it saves an empty state, and an fp16 resume starts afresh
    bf16.mkdir()
    save_checkpoint(bf16, model, optimizer, scheduler, 1, config, torch.amp.GradScaler("cpu", enabled=False))
    fresh = torch.amp.GradScaler("cpu")
    assert load_checkpoint(bf16, model, optimizer, scheduler, fresh) == 1
    assert fresh.get_scale() == 2.0**16


def test_a_finished_run_converts_by_name_in_bf16_and_records_its_lineage(tiny_model_dir, chats, tmp_path):
    _, model, plain, tokenizer, _, _ = fine_tune_steps(tiny_model_dir, chats[0], tmp_path, 2)
    checkpoint = tmp_path / "storage" / "wiki" / "checkpoint_000002"
    checkpoint.mkdir(parents=True)
    export_hf(checkpoint, plain, None, tokenizer)
    metrics = {"step": 2, "eval_loss": 3.5}
    record = FinalRecord("wiki", str(checkpoint), str(checkpoint / HF_FOLDER), str(tiny_model_dir), metrics, "")
    write_final(tmp_path / "storage", record)
    var = tmp_path / "var"
    argv = ["--run", "wiki", "--storage-path", str(tmp_path / "storage"), "--var-dir", str(var), "--name", "wiki"]

    assert convert.main([*argv, "--dtype", "bf16"]) == 0

    version = ModelRegistry(var / "models").resolve("wiki")
    assert version.metadata.dtype == "bfloat16" and version.metadata.training["eval_loss"] == 3.5
    assert version.metadata.source == "run:wiki"
    with safe_open(version.path / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()}  # noqa: SIM118 (not a dict) == {torch.bfloat16}
    served = load_model("wiki:1", ModelRegistry(var / "models"), dtype="bfloat16")
    expected = logits_of(model, tokenizer)
    assert float((logits_of(served.model, served.tokenizer) - expected).abs().max()) < 0.05 * expected.abs().max()


def test_an_unknown_run_says_where_it_looked(tmp_path, capsys):
    code = convert.main(
        ["--run", "nope", "--storage-path", str(tmp_path / "st"), "--var-dir", str(tmp_path), "--name", "x"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "no finished run 'nope'" in err and str(tmp_path / "st" / "nope" / "final.json") in err


def test_a_corrupted_safetensors_file_publishes_nothing(tiny_model_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in tiny_model_dir.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    assert convert.main(["--hf", str(broken), "--name", "broken", "--var-dir", str(tmp_path / "var")]) == 2

    assert "cannot read a causal LM" in capsys.readouterr().err
    assert ModelRegistry(tmp_path / "var" / "models").versions("broken") == []


def test_a_disk_that_fills_during_conversion_publishes_nothing(tiny_model_dir, tmp_path, monkeypatch, capsys):
    def fill_disk(self, folder, *args, **kwargs):  # the disk fills half-way through the weights
        (Path(folder) / "model.safetensors").write_bytes(b"\0" * 1024)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", fill_disk)
    var = tmp_path / "var"

    assert convert.main(["--hf", str(tiny_model_dir), "--name", "full", "--var-dir", str(var)]) == 2

    assert "No space left on device" in capsys.readouterr().err
    assert list((var / "models").iterdir()) == []  # no version, and no scratch folder left behind


# ------------------------------------------------------------------------------------------------ OpenChatKit


def write_openchatkit_stages(model, folder: Path, stages: int) -> None:
    """The layout OpenChatKit's pipeline trainer saves, with the attention buffers old layers carried."""
    state = model.state_dict()
    layers = model.config.num_hidden_layers
    per_stage = layers // stages
    folder.mkdir(parents=True)
    for stage in range(stages):
        out, index = {}, 0
        if stage == 0:
            out["0.embed_in.weight"] = state["gpt_neox.embed_in.weight"]
            index = 1
        for layer in range(stage * per_stage, (stage + 1) * per_stage):
            prefix = f"gpt_neox.layers.{layer}."
            for key, value in state.items():
                if key.startswith(prefix):
                    out[f"{index}.{key[len(prefix) :]}"] = value
            out[f"{index}.attention.rotary_emb.inv_freq"] = torch.ones(4)
            out[f"{index}.attention.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool)
            out[f"{index}.attention.masked_bias"] = torch.tensor(-1e9)
            index += 1
        if stage == stages - 1:
            out[f"{index}.final_layer_norm.weight"] = state["gpt_neox.final_layer_norm.weight"]
            out[f"{index}.final_layer_norm.bias"] = state["gpt_neox.final_layer_norm.bias"]
            out[f"{index}.embed_out.weight"] = state[
                "embed_out.weight" if "embed_out.weight" in state else "lm_head.weight"
            ]
        torch.save(out, folder / f"prank_{stage}_checkpoint.pt")


@pytest.fixture(scope="module")
def four_layer_neox(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    folder = tmp_path_factory.mktemp("neox4")
    tokenizer = train_tiny_tokenizer()
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(3)
    model = GPTNeoXForCausalLM(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model


@pytest.mark.parametrize("stages", [1, 2, 4])
def test_openchatkit_pipeline_stages_convert_to_the_unsplit_models_logits(stages, four_layer_neox, tmp_path):
    config_folder, model = four_layer_neox
    checkpoint = tmp_path / "checkpoint_100"
    write_openchatkit_stages(model, checkpoint, stages)
    var = tmp_path / "var"

    argv = ["--openchatkit", str(checkpoint), "--config", str(config_folder), "--name", "ock", "--var-dir", str(var)]
    assert convert.main(argv) == 0

    tokenizer = train_tiny_tokenizer()
    torch.testing.assert_close(registry_logits(var, "ock:1"), logits_of(model, tokenizer), atol=1e-5, rtol=1e-5)
    assert ModelRegistry(var / "models").resolve("ock").metadata.training["step"] == 100


def test_a_missing_openchatkit_stage_is_named(four_layer_neox, tmp_path):
    write_openchatkit_stages(four_layer_neox[1], tmp_path / "ck", 4)
    (tmp_path / "ck" / "prank_2_checkpoint.pt").unlink()
    with pytest.raises(OpenChatKitError, match=r"missing stage 2 \(prank_2_checkpoint.pt\)"):
        stage_files(tmp_path / "ck")


def test_openchatkit_stages_that_do_not_match_the_config_list_the_keys(four_layer_neox, tiny_model_dir, tmp_path):
    checkpoint = tmp_path / "ck"
    write_openchatkit_stages(four_layer_neox[1], checkpoint, 2)
    state = torch.load(checkpoint / "prank_1_checkpoint.pt")
    state["1.mlp.extra.weight"] = torch.zeros(1)
    torch.save(state, checkpoint / "prank_1_checkpoint.pt")
    two_layers = tiny_model_dir  # a 2-layer config against 4 layers of checkpoints
    argv = ["--openchatkit", str(checkpoint), "--config", str(four_layer_neox[0]), "--name", "ock"]

    with pytest.raises(OpenChatKitError, match=r"unexpected keys \['gpt_neox.layers.3.mlp.extra.weight'\]"):
        convert.convert(convert.build_parser().parse_args([*argv, "--var-dir", str(tmp_path)]))
    with pytest.raises(OpenChatKitError, match=r"hold 4 layers .* num_hidden_layers=2"):
        convert.convert(
            convert.build_parser().parse_args([*argv[:3], str(two_layers), "--name", "o", "--var-dir", str(tmp_path)])
        )
    assert ModelRegistry(tmp_path / "models").names() == []


# ---------------------------------------------------------------------------------------------------- the gate


def test_the_gate_refuses_reinitialised_weights_and_accepts_a_fine_tuned_model(tiny_model_dir, chats, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    train, held_out = chats
    var = tmp_path / "var"
    gate = ["--eval-data", str(held_out), "--seq-length", "64", "--var-dir", str(var), "--name", "city"]

    def tuned_from(start: Path, name: str) -> Path:
        _, _, plain, tokenizer, _, _ = fine_tune_steps(start, train, tmp_path, 6, lr="1e-2")
        plain.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        return tmp_path / name

    served = tuned_from(tiny_model_dir, "tuned")
    assert convert.main(["--hf", str(served), *gate]) == 0  # the first version: nothing to compare with
    reinit = AutoModelForCausalLM.from_config(AutoModelForCausalLM.from_pretrained(served).config)
    reinit.save_pretrained(tmp_path / "reinit")  # fresh random weights, same shape
    (tmp_path / "reinit" / "tokenizer.json").write_bytes((served / "tokenizer.json").read_bytes())
    (tmp_path / "reinit" / "tokenizer_config.json").write_bytes((served / "tokenizer_config.json").read_bytes())

    assert convert.main(["--hf", str(tmp_path / "reinit"), *gate]) == 1
    assert "refused" in capsys.readouterr().out
    assert ModelRegistry(var / "models").versions("city") == ["1"]

    assert convert.main(["--hf", str(tuned_from(served, "tuned-more")), *gate]) == 0
    meta = ModelRegistry(var / "models").resolve("city:2").metadata
    assert meta.gate["decision"] == "accepted" and meta.gate["baseline"] == "city:1"
    assert meta.gate["candidate_eval_perplexity"] < meta.gate["baseline_eval_perplexity"]

    assert convert.main(["--hf", str(tmp_path / "reinit"), *gate, "--force"]) == 0
    forced = ModelRegistry(var / "models").resolve("city:3").metadata.gate
    assert forced["decision"] == "forced" and forced["reasons"]


def test_held_out_loss_is_the_finetunes_measure(tiny_model_dir, chats):
    from training.gate import held_out_metrics

    loaded = load_model(str(tiny_model_dir), None)
    data = load_packed(chats[1], loaded.tokenizer, 64, False, False)
    metrics = held_out_metrics(loaded, chats[1], 64)
    loss, count = token_loss(loaded.model, torch.tensor(data.input_ids), torch.tensor(data.labels))
    assert metrics["eval_loss"] == pytest.approx(loss.item() / count, rel=1e-4)
