"""Training without a Ray cluster: data format, loss mask, mixture sampling, converters, flag checks, and the
per-worker loop run as plain PyTorch in this process (the loop runs without Ray too)."""

from __future__ import annotations

import gzip
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from training import finetune, prepare_data
from training.data import IGNORE_INDEX, DataError, mixture_order, pack, parse_mixture, read_records, tokenize

CITIES = ["Zurich", "Paris", "Berlin", "Vienna", "Geneva", "Basel", "Rome", "Madrid"]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def city_chats(count: int, offset: int = 0) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"Where is {CITIES[(i + offset) % len(CITIES)]}?"},
                {"role": "assistant", "content": f"{CITIES[(i + offset) % len(CITIES)]} is a city in Europe."},
            ]
        }
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def labelled_text(tokenizer, labels: list[int]) -> str:
    return tokenizer.decode([t for t in labels if t != IGNORE_INDEX])


def test_openchatkit_text_trains_only_on_the_bot_turn_and_eos(tokenizer):
    ids, labels = tokenize({"text": "<human>: Where is Zurich?\n<bot>: Zurich is in Switzerland.\n"}, tokenizer)
    assert labelled_text(tokenizer, labels) == " Zurich is in Switzerland.\n<|endoftext|>"
    assert tokenizer.decode(ids).startswith("<human>: Where is Zurich?")
    _, every = tokenize({"text": "<human>: Hi\n<bot>: Hello\n"}, tokenizer, train_on_prompt=True)
    assert labelled_text(tokenizer, every) == "<human>: Hi\n<bot>: Hello\n<|endoftext|>"


def test_chat_messages_use_the_models_template_and_mask_every_user_turn(tokenizer):
    templated = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    templated.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    record = {
        "messages": [
            {"role": "user", "content": "Where is Zurich?"},
            {"role": "assistant", "content": "In Switzerland."},
            {"role": "user", "content": "And Paris?"},
            {"role": "assistant", "content": "In France."},
        ]
    }
    ids, labels = tokenize(record, templated)
    assert templated.decode(ids).startswith("<|user|>Where is Zurich?\n<|assistant|>In Switzerland.")
    assert labelled_text(templated, labels) == "In Switzerland.\nIn France.\n<|endoftext|>"
    # Without a chat template the same messages become OpenChatKit turns.
    ids, labels = tokenize(record, tokenizer)
    assert tokenizer.decode(ids).startswith("<human>: Where is Zurich?\n<bot>: In Switzerland.\n<human>: And Paris?")
    assert labelled_text(tokenizer, labels) == " In Switzerland.\n In France.\n<|endoftext|>"


def test_packing_fills_fixed_rows_and_pads_only_the_last():
    examples = [([1, 2, 3], [IGNORE_INDEX, 2, 3]), ([4, 5, 6, 7, 8], [4, 5, IGNORE_INDEX, 7, 8])]
    packed = pack(examples, seq_length=3, pad_id=0)
    assert packed.input_ids.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 0]]
    assert packed.labels.tolist() == [[IGNORE_INDEX, 2, 3], [4, 5, IGNORE_INDEX], [7, 8, IGNORE_INDEX]]


def test_mixture_samples_sources_in_proportion_to_their_weights_and_repeats_exactly():
    order = mixture_order(sizes=[100, 50], weights=[3.0, 1.0], count=8000, seed=1)
    share_of_first = float(np.mean(order < 100))
    assert share_of_first == pytest.approx(0.75, abs=0.02)
    assert set(order[order >= 100].tolist()) == set(range(100, 150))  # the small source cycles through every row
    assert np.array_equal(order, mixture_order([100, 50], [3.0, 1.0], 8000, seed=1))
    assert not np.array_equal(order, mixture_order([100, 50], [3.0, 1.0], 8000, seed=2))


def test_mixture_spec_needs_existing_files_and_positive_weights(tmp_path: Path):
    a, b = write_jsonl(tmp_path / "a.jsonl", city_chats(1)), write_jsonl(tmp_path / "b.jsonl", city_chats(1))
    sources = parse_mixture(f"{a}:2,{b}")
    assert [(s.path.name, s.weight) for s in sources] == [("a.jsonl", 2.0), ("b.jsonl", 1.0)]
    with pytest.raises(DataError, match="does not exist"):
        parse_mixture(f"{tmp_path / 'missing.jsonl'}:1")
    with pytest.raises(DataError, match="must be > 0"):
        parse_mixture(f"{a}:0")


def test_malformed_lines_are_reported_with_file_and_line_then_skipped_or_fatal(tmp_path: Path, capfd):
    from services.common.logs import setup_logging

    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [*city_chats(1), "{not json", {"messages": [{"role": "user", "content": "no answer"}]}, *city_chats(1)],
    )
    setup_logging("test")
    assert len(list(read_records(path))) == 2
    err = capfd.readouterr().err
    assert f"{path}:2: invalid JSON" in err and f"{path}:3: no assistant message" in err
    with pytest.raises(DataError, match=rf"{path}:2: invalid JSON"):
        list(read_records(path, strict=True))


def test_dolly_converter_joins_instruction_and_context(tmp_path: Path):
    source = write_jsonl(
        tmp_path / "dolly.jsonl",
        [
            {"instruction": "Where is Zurich?", "context": "", "response": "In Switzerland.", "category": "open_qa"},
            {"instruction": "Summarise.", "context": "Zurich is big.", "response": "Big city.", "category": "x"},
            {"instruction": "", "context": "", "response": "orphan"},
        ],
    )
    out = tmp_path / "out.jsonl"
    assert prepare_data.main(["dolly", str(source), "-o", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records[0]["messages"] == [
        {"role": "user", "content": "Where is Zurich?"},
        {"role": "assistant", "content": "In Switzerland."},
    ]
    assert records[1]["messages"][0]["content"] == "Summarise.\n\nZurich is big."
    assert len(records) == 2
    assert prepare_data.main(["dolly", str(source), "-o", str(out), "--strict"]) == 2


def oasst_message(role: str, text: str, rank: int | None = None, replies: list | None = None) -> dict:
    return {"role": role, "text": text, "rank": rank, "deleted": False, "replies": replies or []}


def test_oasst1_trees_follow_the_best_ranked_path(tmp_path: Path):
    tree = oasst_message(
        "prompter",
        "Where is Zurich?",
        replies=[
            oasst_message("assistant", "Somewhere.", rank=1),
            oasst_message(
                "assistant",
                "In Switzerland.",
                rank=0,
                replies=[oasst_message("prompter", "Which canton?", replies=[])],  # a trailing question is dropped
            ),
        ],
    )
    source = tmp_path / "oasst.trees.jsonl.gz"
    with gzip.open(source, "wt") as handle:
        handle.write(json.dumps({"message_tree_id": "t1", "prompt": tree}) + "\n")
        handle.write(json.dumps({"message_tree_id": "t2", "prompt": oasst_message("prompter", "Unanswered")}) + "\n")
    out = tmp_path / "out.jsonl"
    assert prepare_data.main(["oasst1", str(source), "-o", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records == [
        {
            "messages": [
                {"role": "user", "content": "Where is Zurich?"},
                {"role": "assistant", "content": "In Switzerland."},
            ]
        }
    ]


def test_oasst1_flat_messages_are_rebuilt_into_trees(tmp_path: Path):
    rows = [
        {"message_id": "a", "parent_id": None, "role": "prompter", "text": "Hi?", "rank": None},
        {"message_id": "b", "parent_id": "a", "role": "assistant", "text": "Worse.", "rank": 1},
        {"message_id": "c", "parent_id": "a", "role": "assistant", "text": "Hello!", "rank": 0},
    ]
    source, out = write_jsonl(tmp_path / "flat.jsonl", rows), tmp_path / "out.jsonl"
    assert prepare_data.main(["oasst1", str(source), "-o", str(out)]) == 0
    assert json.loads(out.read_text())["messages"][1]["content"] == "Hello!"


def test_oig_keeps_openchatkit_text_and_rejects_lines_without_turns(tmp_path: Path):
    source = write_jsonl(
        tmp_path / "oig.jsonl",
        [{"text": "<human>: Where is Zurich?\n<bot>: In Switzerland.", "metadata": {}}, {"text": "no turns here"}],
    )
    out = tmp_path / "out.jsonl"
    assert prepare_data.main(["oig", str(source), "-o", str(out)]) == 0
    assert json.loads(out.read_text()) == {"text": "<human>: Where is Zurich?\n<bot>: In Switzerland.\n"}
    assert prepare_data.main(["check", str(out), "--strict"]) == 0


def test_wiki_chat_data_is_split_into_train_and_held_out_eval(tmp_path: Path):
    assert prepare_data.main(["wiki", "--limit", "60", "--eval-fraction", "0.2", "-o", str(tmp_path)]) == 0
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    held_out = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert len(train) + len(held_out) == 60 and 3 <= len(held_out) <= 25
    first = train[0]["messages"]
    assert first[0]["role"] == "user" and first[1]["role"] == "assistant" and len(first[1]["content"]) > 40
    assert {m["messages"][1]["content"] for m in train}.isdisjoint(m["messages"][1]["content"] for m in held_out)


# ------------------------------------------------------------------------------------- fail fast, before Ray


@pytest.fixture
def chat_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", city_chats(40))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--batch-size", "6", "--micro-batch-size", "2", "--num-workers", "2"], "not divisible by --num-workers 2"),
        (["--batch-size", "8", "--gradient-accumulate-step", "3"], "disagrees with --batch-size"),
        (["--optimizer", "8bit-adam"], "8bit-adam (bitsandbytes) needs CUDA"),
        (["--strategy", "fsdp"], "fsdp runs on GPUs only"),
        (["--epochs", "1"], "exactly one of --total-steps or --epochs"),
        (["--seq-length", "4096"], "exceeds the model's context of 1024"),
        (["--lr-scheduler", "sawtooth"], "--lr-scheduler 'sawtooth' is not one of linear, cosine"),
    ],
)
def test_bad_arguments_fail_before_ray_starts(extra, message, tiny_model_dir, chat_file, tmp_path, capsys):
    import ray

    argv = ["--model", str(tiny_model_dir), "--data", str(chat_file), "--total-steps", "2", "--var-dir", str(tmp_path)]
    assert finetune.main([*argv, *extra]) == 2
    assert message in capsys.readouterr().err
    assert not ray.is_initialized()


def test_unknown_model_and_missing_data_name_what_is_wrong(tiny_model_dir, chat_file, tmp_path, capsys):
    import ray

    assert finetune.main(["--model", "no-such-model", "--data", str(chat_file), "--total-steps", "1"]) == 2
    assert "'no-such-model' is neither a folder, a registered model" in capsys.readouterr().err
    missing = tmp_path / "nope.jsonl"
    assert finetune.main(["--model", str(tiny_model_dir), "--data", f"{missing}:1", "--total-steps", "1"]) == 2
    assert f"data file {missing} does not exist" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_help_explains_every_flag():
    parser = finetune.build_parser()
    undocumented = [a.dest for a in parser._actions if a.dest != "help" and not a.help]
    assert undocumented == []
    text = parser.format_help()
    for flag in ["--gradient-accumulate-step", "--train-on-prompt", "--lora", "--run-name", "--train-log-backend"]:
        assert flag in text


# ------------------------------------------------------------------------------------ the loop, without Ray


def run_loop_without_ray(tiny_model_dir: Path, tmp_path: Path, *extra: str) -> list[dict]:
    train = write_jsonl(tmp_path / "train.jsonl", city_chats(64))
    held_out = write_jsonl(tmp_path / "eval.jsonl", city_chats(8, offset=3))
    argv = ["--model", str(tiny_model_dir), "--data", str(train), "--eval-data", str(held_out)]
    argv += ["--seq-length", "64", "--batch-size", "4", "--micro-batch-size", "2", "--total-steps", "12"]
    argv += ["--lr", "3e-3", "--warmup-steps", "1", "--eval-steps", "6", "--var-dir", str(tmp_path), *extra]
    _, config, data, _ = finetune.build_run(argv)
    config.checkpoint_steps = 1000  # the last step still writes one, into a temporary folder
    return finetune.train_loop_per_worker({"config": asdict(config), "data": data, "use_ray": False})


def test_the_worker_loop_runs_as_plain_pytorch_and_the_eval_loss_falls(tiny_model_dir, tmp_path, capfd):
    history = run_loop_without_ray(tiny_model_dir, tmp_path)
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert len(evals) == 3 and evals[-1] < evals[0] - 0.5
    assert history[-1]["step"] == 12 and history[-1]["tokens_per_s"] > 0
    out = capfd.readouterr().out
    assert "step 12/12 loss" in out and "tokens/s ETA" in out


def test_every_logged_step_lands_in_metrics_jsonl_at_full_precision(tiny_model_dir, tmp_path):
    """What a resumed run is compared with, step by step: the printed loss has 4 decimals, this file all of them."""
    history = run_loop_without_ray(tiny_model_dir, tmp_path)
    lines = (tmp_path / "logs" / "training" / "finetune" / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(line) for line in lines]
    assert [entry["step"] for entry in logged] == list(range(13))  # step 0 is the first eval
    assert [entry["loss"] for entry in logged if "loss" in entry] == [h["loss"] for h in history if "loss" in h]
    assert all(entry["time"] > 0 for entry in logged)


def test_a_lora_run_learns_and_logs_to_wandb_offline(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    history = run_loop_without_ray(
        tiny_model_dir, tmp_path, "--lora", "--lora-rank", "4", "--train-log-backend", "wandb"
    )
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert evals[-1] < evals[0]
    runs = list((tmp_path / "logs" / "training" / "finetune" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1


def test_a_lora_adapter_is_merged_into_the_exported_hugging_face_folder(tiny_model_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    prompt = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = model(input_ids=prompt).logits
    finetune.export_hf(tmp_path, model, None, AutoTokenizer.from_pretrained(tiny_model_dir))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / finetune.HF_FOLDER)
    assert not any("lora" in name for name in exported.state_dict())
    with torch.no_grad():
        assert torch.allclose(exported(input_ids=prompt).logits, expected, atol=1e-4)


def test_epochs_set_the_step_count_and_loguru_writes_progress_to_a_file_under_var(tiny_model_dir, tmp_path):
    from services.common.logs import setup_logging

    train = write_jsonl(tmp_path / "train.jsonl", city_chats(32))
    argv = ["--model", str(tiny_model_dir), "--data", str(train), "--seq-length", "64", "--batch-size", "4"]
    argv += ["--epochs", "2", "--train-log-backend", "loguru", "--var-dir", str(tmp_path)]
    _, config, data, _ = finetune.build_run(argv)
    assert config.total_steps == -(-2 * len(data.train) // 4)
    try:
        finetune.train_loop_per_worker({"config": asdict(config), "data": data, "use_ray": False})
    finally:
        setup_logging("test")  # the loop pointed loguru at its file; close it
    (log_file,) = (tmp_path / "logs" / "training" / "finetune").glob("file_*.log")
    assert f"step {config.total_steps}/{config.total_steps} loss" in log_file.read_text()


def test_var_data_paths_name_the_files_under_nightcap_var_where_the_working_dir_has_no_var(
    tiny_model_dir, tmp_path, monkeypatch
):
    """What a `ray job submit --working-dir .` job sees: an upload of the tree without the git-ignored var/,
    and the head's absolute NIGHTCAP_VAR. The training guide's var/data/... paths must name the files there."""
    var = tmp_path / "head-var"
    data = var / "data" / "wiki-chat"
    data.mkdir(parents=True)
    write_jsonl(data / "train.jsonl", city_chats(48))
    write_jsonl(data / "eval.jsonl", city_chats(4, 3))
    job_dir = tmp_path / "job-working-dir"
    job_dir.mkdir()
    monkeypatch.chdir(job_dir)
    monkeypatch.setenv("NIGHTCAP_VAR", str(var))
    argv = ["--model", str(tiny_model_dir), "--data", "var/data/wiki-chat/train.jsonl:1", "--seq-length", "64"]
    argv += ["--eval-data", "var/data/wiki-chat/eval.jsonl", "--total-steps", "2", "--batch-size", "4"]
    args, _, prepared, _ = finetune.build_run(argv)
    assert args.data == f"{data / 'train.jsonl'}:1"
    assert args.eval_data == str(data / "eval.jsonl")
    assert prepared.train.conversations == 48 and prepared.eval is not None
