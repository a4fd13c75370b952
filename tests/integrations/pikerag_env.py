"""PIKE-RAG from the checkout ``PIKERAG_PATH`` names, on the modest dependencies of requirements.txt here.

PIKE-RAG has no package metadata: its users put the checkout on ``PYTHONPATH``, and so does this module.
Two of its packages' ``__init__`` files import every implementation they hold: ``pikerag.knowledge_retrievers``
(the Chroma and BM25 retrievers: chromadb, langchain-chroma, langchain-community) and
``pikerag.document_transformers`` (the splitters: langchain's text_splitter, spaCy). The QA workflow with
``BaseQaRetriever`` (no index) and the tagging workflow with ``LLMPoweredTagger`` run none of that code.
When those stacks are not installed, the two packages are made from their real folders without running
their ``__init__``, holding the one class each workflow uses; every module that runs is PIKE-RAG's own
file. With PIKE-RAG's full requirements installed, PIKE-RAG is imported as it is.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

ENV = "PIKERAG_PATH"
LEAN = {
    "pikerag.knowledge_retrievers": {"BaseQaRetriever": "base_qa_retriever"},
    "pikerag.document_transformers": {"LLMPoweredTagger": "tagger.llm_powered_tagger"},
}
# What those __init__ files import for the implementations the tier does not run.
UNUSED_STACKS = {"chromadb", "langchain_chroma", "langchain_community", "langchain", "spacy", "rank_bm25"}


def checkout() -> Path | None:
    """The PIKE-RAG checkout named by $PIKERAG_PATH, or None when it is not set."""
    value = os.environ.get(ENV, "").strip()
    return Path(value).expanduser().resolve() if value else None


def import_pikerag(path: Path) -> list[str]:
    """Put ``path`` on sys.path and make PIKE-RAG's workflows importable; returns what was imported lean."""
    if not (path / "pikerag" / "__init__.py").is_file():
        raise FileNotFoundError(f"{ENV}={path}: no pikerag package there (expected a PIKE-RAG checkout)")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    lean = []
    for package, names in LEAN.items():
        if package in sys.modules:
            continue
        try:
            importlib.import_module(package)
            continue
        except ModuleNotFoundError as error:
            missing = error.name or ""
            if missing.split(".")[0] not in UNUSED_STACKS:
                raise
        spec = importlib.util.find_spec(package)
        module = importlib.util.module_from_spec(spec)  # the package, its __init__ not run
        sys.modules[package] = module
        parent, _, child = package.rpartition(".")
        setattr(sys.modules[parent], child, module)
        for name, submodule in names.items():
            setattr(module, name, getattr(importlib.import_module(f"{package}.{submodule}"), name))
        lean.append(f"{package} without {missing}")
    return lean
