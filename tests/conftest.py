"""Shared fixtures: a tiny random GPT-NeoX with a tokenizer trained on the spot, and real servers on
127.0.0.1 port 0, always torn down."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

TINY_CORPUS = [
    "<human>: Where is Zurich?\n<bot>: Zurich is in Switzerland, on Lake Zurich.",
    "<human>: What is the capital of France?\n<bot>: Paris is the capital of France.",
    "The quick brown fox jumps over the lazy dog. Grüße aus Zürich, café naïve.",
    "Zurich is the largest city in Switzerland. Geneva and Basel are cities too.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Emoji: 🙂 🚀 and symbols € £ ¥.",
]


def train_tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on TINY_CORPUS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(TINY_CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def build_tiny_cross_encoder(folder: Path, texts: list[str]) -> Path:
    """A random one-layer BERT cross-encoder (seeded) with a word-level vocabulary of ``texts``: its scores mean
    nothing, but they differ from passage to passage, which is all a test of the ordering needs."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    words = sorted({word for text in texts for word, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text.lower())})
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_max_length=512,
    ).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        num_labels=1,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


def _build_tiny(folder: Path, architecture: str, **shape: int) -> Path:
    """A random 2-layer model of ``architecture`` (an AutoConfig model type) with the tiny tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fast = train_tiny_tokenizer()
    config = AutoConfig.for_model(
        architecture,
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=1024,
        eos_token_id=fast.eos_token_id,
        bos_token_id=fast.bos_token_id,
        **shape,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def build_tiny_gpt_neox(folder: Path) -> Path:
    """GPT-NeoX: the RedPajama architecture."""
    return _build_tiny(folder, "gpt_neox")


def build_tiny_llama(folder: Path) -> Path:
    """Llama, the default model's architecture, with grouped KV heads."""
    return _build_tiny(folder, "llama", num_key_value_heads=2)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gpt_neox(tmp_path_factory.mktemp("models") / "tiny-gpt-neox")


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from services.common.registry import ModelRegistry
    from services.generation.loading import load_model

    return load_model(str(tiny_model_dir), ModelRegistry(tmp_path_factory.mktemp("registry")))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random Llama, loaded: the second architecture beside ``tiny_loaded``'s GPT-NeoX."""
    from services.common.registry import ModelRegistry
    from services.generation.loading import load_model

    folder = build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")
    return load_model(str(folder), ModelRegistry(tmp_path_factory.mktemp("registry")))


@pytest.fixture(params=["gpt_neox", "llama"])
def model(request, tiny_loaded, tiny_llama):
    """Each engine test once per architecture."""
    return tiny_loaded if request.param == "gpt_neox" else tiny_llama


PREFIX_CACHE = 256 << 20  # bytes of prefix cache for the shared generation servers, as `serve` has by default


@pytest.fixture(scope="session")
def generation_server(tiny_loaded):
    """A real Generation server on 127.0.0.1 (any free port) serving the tiny GPT-NeoX: (address, engine)."""
    from services.generation.engine.scheduler import SchedulerConfig
    from services.generation.engine.speculation import SPECULATIVE_MAX_BATCH, SPECULATIVE_TOKENS
    from services.generation.loading import start_engine
    from services.generation.server import start_generation_server

    config = SchedulerConfig(
        max_concurrent_requests=32,
        prefix_cache_bytes=PREFIX_CACHE,
        speculative_tokens=SPECULATIVE_TOKENS,  # as `serve` has by default
        speculative_max_batch=SPECULATIVE_MAX_BATCH,
    )
    engine = start_engine(tiny_loaded, config)
    running = start_generation_server(tiny_loaded, engine, "127.0.0.1:0", default_max_new_tokens=16)
    yield running.address, engine
    engine.shutdown(grace=1.0)
    running.stop(grace=1.0)


@pytest.fixture(scope="session")
def generation_address(generation_server) -> str:
    return generation_server[0]


# Llama 2's chat format: a model folder whose template is neither ChatML (the default model's) nor OpenChatKit's.
LLAMA2_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)


@pytest.fixture(scope="session")
def templated_llama_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Generation server for `serve --model FOLDER`: a tiny Llama folder with Llama 2's chat template."""
    from transformers import AutoTokenizer

    from services.common.registry import ModelRegistry
    from services.generation.engine.scheduler import SchedulerConfig
    from services.generation.loading import load_model, start_engine
    from services.generation.server import start_generation_server

    folder = build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama-chat")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = LLAMA2_TEMPLATE
    tokenizer.save_pretrained(folder)
    loaded = load_model(str(folder), ModelRegistry(tmp_path_factory.mktemp("registry")))
    engine = start_engine(loaded, SchedulerConfig(prefix_cache_bytes=PREFIX_CACHE))
    running = start_generation_server(loaded, engine, "127.0.0.1:0", default_max_new_tokens=16)
    yield running.address
    engine.shutdown(grace=1.0)
    running.stop(grace=1.0)


# A slice of the default Wikipedia corpus: enough neighbours that finding Zurich means something.
CORPUS_SLICE_TITLES = ["Zurich", "Switzerland", "Geneva", "Paris", "France", "Berlin", "Vienna", "Alps", "Rhine"]
CORPUS_SLICE_LIMIT = 24


@pytest.fixture(scope="session")
def embedder():
    from services.retrieval.embedder import Embedder

    return Embedder()


@pytest.fixture(scope="session")
def small_index(embedder, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(var_dir, index name): the corpus slice indexed under var_dir/indexes/wiki-slice."""
    from services.retrieval.build import build_index
    from services.retrieval.corpus import read_wikipedia_summaries

    var_dir = tmp_path_factory.mktemp("var")
    documents = read_wikipedia_summaries(limit=CORPUS_SLICE_LIMIT, titles=CORPUS_SLICE_TITLES)
    build_index(documents, embedder, var_dir / "indexes" / "wiki-slice", progress=False)
    return var_dir, "wiki-slice"


@pytest.fixture(scope="session")
def retrieval_address(embedder, small_index) -> Iterator[str]:
    from services.retrieval.index import load_index
    from services.retrieval.retriever import Retriever
    from services.retrieval.server import start_retrieval_server

    var_dir, name = small_index
    index = load_index(var_dir / "indexes" / name)
    running = start_retrieval_server(Retriever(embedder, index), "127.0.0.1:0")
    yield running.address
    running.stop(grace=1.0)
    index.close()


def start_orchestrator(
    generation: str, retrieval: str | None, max_new_tokens: int = 16, query_mode: str = "recent", grounding=None
):
    from services.orchestrator.server import start_chat_server

    return start_chat_server(
        generation,
        retrieval,
        "127.0.0.1:0",
        default_max_new_tokens=max_new_tokens,
        backend_timeout=5,
        query_mode=query_mode,
        grounding=grounding,
    )


@pytest.fixture(scope="session")
def orchestrator_address(generation_address: str, retrieval_address: str) -> Iterator[str]:
    """The three services together: a real orchestrator in front of the tiny model and the corpus slice."""
    running = start_orchestrator(generation_address, retrieval_address)
    yield running.address
    running.stop(grace=1.0)


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    """Every loguru message (INFO and up) logged in this process while the test runs."""
    from loguru import logger

    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="INFO", format="{message}")
    yield lines
    logger.remove(sink)


def wait_for(predicate, timeout: float = 10.0) -> bool:
    """Polls ``predicate`` until it is true (True) or ``timeout`` seconds pass (False)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def start_gateway(orchestrator: str, generation: str, retrieval: str | None, **settings):
    """The HTTP gateway on 127.0.0.1 (any free port) in front of the given services: a RunningGateway
    (``.url``, ``.stop()``). ``settings`` are GatewaySettings fields (tokens_file: a Path, read as
    ``--tokens-file`` is)."""
    from services.common.security import TokenTable
    from services.gateway.app import GatewaySettings
    from services.gateway.server import start_gateway as start

    tokens_file = settings.pop("tokens_file", None)
    if tokens_file is not None:
        settings["tokens"] = TokenTable(tokens_file)
    return start(GatewaySettings(orchestrator, generation, retrieval, **settings))


@pytest.fixture(scope="session")
def gateway_url(orchestrator_address: str, generation_address: str, retrieval_address: str) -> Iterator[str]:
    """The HTTP gateway in front of the tiny stack: its base URL (http://127.0.0.1:PORT)."""
    running = start_gateway(orchestrator_address, generation_address, retrieval_address)
    yield running.url
    running.stop()


@pytest.fixture(scope="session")
def default_registry(tmp_path_factory: pytest.TempPathFactory):
    """A registry holding the embedded default (SmolLM2-135M-Instruct converted from its GGUF)."""
    from services.common.registry import ModelRegistry
    from services.generation.loading import prepare_default

    registry = ModelRegistry(tmp_path_factory.mktemp("var") / "models")
    prepare_default(registry)
    return registry


@pytest.fixture(scope="session")
def default_generation_address(default_registry) -> Iterator[str]:
    """A real Generation server serving the embedded default."""
    from services.generation.engine.scheduler import SchedulerConfig
    from services.generation.loading import DEFAULT_MODEL, load_model, start_engine
    from services.generation.server import start_generation_server

    loaded = load_model(DEFAULT_MODEL, default_registry)
    engine = start_engine(loaded, SchedulerConfig(prefix_cache_bytes=PREFIX_CACHE))
    running = start_generation_server(loaded, engine, "127.0.0.1:0")
    yield running.address
    engine.shutdown(grace=1)
    running.stop(grace=1)


# An orchestrator's turn that grounds its answer in two passages, cites the second, and was searched while the
# index was still being built: what the real orchestrator sends once its model cites, which the random tiny
# model never does.
CITED_ANSWER = "Zurich is the largest city in Switzerland [2]. Geneva is another [9]."
CITED_BUILD_NOTICE = "the index is still being built: 4,000 of 10,033 documents are searched so far"


def cited_turn() -> list:
    """The ChatResponses of that turn, in order."""
    from nightcap.v1 import chat_pb2, common_pb2, retrieval_pb2

    passages = [
        retrieval_pb2.Passage(
            id="geneva#0", title="Geneva", source="https://en.wikipedia.org/wiki/Geneva", score=0.61,
            text="Geneva is the second-most populous city in Switzerland.",
        ),
        retrieval_pb2.Passage(
            id="zurich#0", title="Zurich", source="https://en.wikipedia.org/wiki/Zurich", score=0.83,
            text="Zurich is the largest city in Switzerland and the capital of the canton of Zurich.",
        ),
    ]  # fmt: skip
    build = retrieval_pb2.IndexBuild(state="building", documents_done=4000, documents_total=10033, elapsed_s=12.5)
    start = chat_pb2.ChatStart(sources=passages, model="scripted:1", retrieval_query="Where is Zurich?")
    start.index_build.CopyFrom(build)
    words = CITED_ANSWER.split(" ")
    deltas = [chat_pb2.ChatResponse(delta=word if i == 0 else " " + word) for i, word in enumerate(words)]
    end = chat_pb2.ChatEnd(
        finish_reason=common_pb2.FINISH_REASON_EOS, prompt_tokens=40, completion_tokens=len(words),
        context_used=True, notice=CITED_BUILD_NOTICE, cited=[2], cited_ids=["zurich#0"],
    )  # fmt: skip
    return [chat_pb2.ChatResponse(start=start), *deltas, chat_pb2.ChatResponse(end=end)]


def start_scripted_orchestrator(turn: list):
    """A Chat server that answers every turn with ``turn`` (a list of ChatResponses): a RunningServer."""
    from nightcap.v1 import chat_pb2_grpc
    from services.common.server import ServiceBinding, start_server

    class ScriptedChat(chat_pb2_grpc.ChatServicer):
        def Chat(self, request, context):
            yield from turn

    return start_server(
        [ServiceBinding("nightcap.v1.Chat", chat_pb2_grpc.add_ChatServicer_to_server, ScriptedChat())], "127.0.0.1:0"
    )


@pytest.fixture(scope="session")
def cited_orchestrator_address() -> Iterator[str]:
    """An orchestrator that answers every question with ``cited_turn()``."""
    running = start_scripted_orchestrator(cited_turn())
    yield running.address
    running.stop(grace=0)


@pytest.fixture(scope="session")
def node_client() -> Path:
    """tests/node/chat_client.mjs, with its @grpc/grpc-js installed (npm ci, once); skipped without node."""
    import shutil
    import subprocess

    if shutil.which("node") is None:
        pytest.skip("node is not installed: the Node.js client cannot run")
    folder = Path(__file__).parent / "node"
    if not (folder / "node_modules" / "@grpc" / "grpc-js").is_dir():
        npm = shutil.which("npm")
        assert npm is not None, "node is here but npm is not: install npm to fetch @grpc/grpc-js"
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=folder, check=True, timeout=300)
    return folder / "chat_client.mjs"
