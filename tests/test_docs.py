"""The documentation site's pages (docs/*.md): every Python block runs as written, page by page
(the harness: tests/markdown_blocks.py); the API page covers the public API; the CLI reference
is the command's own help. ``mkdocs build --strict`` (in .ci/run) checks links and references.
"""

from __future__ import annotations

import argparse
import importlib.util
import re

import pytest
from sybil import Example

import cachedload
from tests.conftest import REPO_ROOT, clear_platform_dir_caches
from tests.markdown_blocks import Document, examples, make_workspace, python_blocks

DOCS = REPO_ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
_EXAMPLES = {page.name: examples(page) for page in PAGES}
_BLOCKS = [(page, block) for page, found in _EXAMPLES.items() for block in python_blocks(found)]


@pytest.fixture(scope="module")
def documents(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Document]:
    """One namespace and one working folder per page, made when the page's first block runs."""
    return {}


# Machine-dependent advice from torch (fewer CPUs here than a page's num_workers).
@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
@pytest.mark.parametrize(
    ("page", "example"), _BLOCKS, ids=[f"{page}:{block.line}" for page, block in _BLOCKS]
)
def test_docs_python_block_runs_as_written(
    page: str,
    example: Example,
    documents: dict[str, Document],
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if page not in documents:
        folder = make_workspace(tmp_path_factory.mktemp(page.removesuffix(".md")))
        documents[page] = Document(_EXAMPLES[page], folder)
    # One cache per page, as a reader's session has (conftest gives each test its own).
    monkeypatch.setenv("CACHEDLOAD_DIR", str(documents[page].folder / "cache"))
    clear_platform_dir_caches()
    monkeypatch.chdir(documents[page].folder)
    documents[page].run_through(example)


def test_blocks_not_run_are_few_and_say_why() -> None:
    """Only the S3 examples are skipped, each with a sentence saying why."""
    for page in PAGES:
        text = page.read_text()
        for match in re.finditer(r"<!-- skip: next -->\n(.*)\n", text):
            assert match.group(1).startswith("(Not run"), f"{page.name}: {match.group(1)!r}"
        if "<!-- skip" in text:
            assert page.name == "sharing.md"


def test_every_page_is_in_the_nav() -> None:
    nav = (REPO_ROOT / "mkdocs.yml").read_text()
    for page in PAGES:
        assert f": {page.name}" in nav, page.name


def test_the_api_page_documents_the_public_api() -> None:
    text = (DOCS / "api.md").read_text()
    documented = set(re.findall(r"^::: cachedload\.(\w+)$", text, re.MULTILINE))
    assert documented == set(cachedload.__all__) - {"__version__"}
    assert "::: cachedload.torch.MappedImages" in text
    assert "::: cachedload.tf.dataset" in text


def _hooks() -> object:
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cli_reference_is_every_command_s_help() -> None:
    from cachedload.cli import _parser

    reference: str = _hooks().cli_reference()  # type: ignore[attr-defined]
    commands: dict[str, argparse.ArgumentParser] = next(
        action.choices
        for action in _parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    assert set(commands) == {"ls", "info", "clear", "prune", "why", "verify", "demo"}
    for name, sub in commands.items():
        assert f"### `cachedload {name}`" in reference
        for action in sub._actions:
            for flag in action.option_strings:
                assert flag in reference, (name, flag)
    assert "--version" in reference
    assert "~/.cache/cachedload" in reference  # not the machine's own cache directory
    assert "<!-- cli-reference -->" in (DOCS / "managing.md").read_text()


def test_the_notebooks_page_shows_the_notebook_s_magics() -> None:
    import json

    notebook = json.loads((DOCS / "notebooks" / "quickstart.ipynb").read_text())
    cells = ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"]
    page = (DOCS / "notebooks.md").read_text()
    shown = re.search(r"```ipython\n(.*?)```", page, re.DOTALL)
    assert shown is not None
    assert shown.group(1).strip() == cells[0].strip()


def test_the_framework_pages_have_a_block_for_every_workflow() -> None:
    def texts(page: str) -> list[str]:
        return [str(example.parsed) for example in python_blocks(_EXAMPLES[page])]

    torch_blocks = texts("pytorch.md")
    assert any("MappedImages(load_train" in text for text in torch_blocks)  # 1. in memory
    assert any("num_workers=" in text for text in torch_blocks)  # 2. larger than RAM, workers
    assert any("index_of(" in text for text in torch_blocks)  # 3. per-item lookup
    assert any("class HandWrittenMappedImages" in text for text in torch_blocks)
    tf_blocks = texts("tensorflow.md")
    assert any("from_tensor_slices(" in text for text in tf_blocks)  # in memory
    assert any("output_signature" in text for text in tf_blocks)  # a generator over a map
    assert any("cachedload.tf.dataset(" in text for text in tf_blocks)


def test_install_instructions_name_a_checkout_or_a_wheel_not_an_index() -> None:
    # cachedload is not on a package index: "pip install cachedload" (or "cachedload[s3]")
    # fails for whoever copies it.
    by_name = re.compile(r"""pip install (-[-\w]+ )*["']?cachedload\b|cachedload\[""")
    texts = [REPO_ROOT / "README.md", REPO_ROOT / "CONTRIBUTING.md", *PAGES]
    texts += [*(REPO_ROOT / "cachedload").glob("*.py"), *(REPO_ROOT / "benchmarks").glob("*.py")]
    found = [f"{path.name}:{line}" for path in texts
             for line, text in enumerate(path.read_text().splitlines(), 1)
             if by_name.search(text)]  # fmt: skip
    assert found == []
    install = (DOCS / "index.md").read_text()
    assert "pip install ." in install and "python -m build" in install
    assert "pip install dist/cachedload-" in install
