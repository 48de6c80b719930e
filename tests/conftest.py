"""Real servers on loopback and real models built or fetched locally: the fixtures every test shares."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import settings

from fedbpt.loopback import free_port, serve_app  # noqa: F401  (fixtures and tests import them from here)

# One folder per part of the stack; each test carries its folder's marker (`pytest -m service`, `-m "not system"`).
ROLES = ("aggregator", "clients", "service", "system")


ROOT = Path(__file__).resolve().parents[1]
# What a test run may add to the checkout: caches of the tools and of the assets, nothing a test wrote.
_TOOL_CACHES = (".pytest_cache", ".hypothesis", ".cache/", ".mypy_cache", ".ruff_cache", ".venv")


def _checkout_files() -> dict[str, int] | None:
    """Untracked and ignored paths of the checkout with their modification times (None outside a git checkout): a
    file a test writes again under an existing name counts as left behind too."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--ignored", "--untracked-files=all"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    paths = {line[3:] for line in out.stdout.splitlines() if line[:2] in ("??", "!!")}
    kept = [p for p in paths if "__pycache__" not in p and not p.startswith(_TOOL_CACHES)]
    return {p: _mtime(ROOT / p) for p in kept}


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return -1


def _home_state_files() -> set[str]:
    """What the user's own client state directory holds: a test must never write there."""
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "fedbpt"
    return {str(p) for p in base.rglob("*")} if base.is_dir() else set()


def pytest_sessionstart(session):
    # Client processes keep their aggregator tokens under FEDBPT_STATE_DIR: the tests' go to a folder of their own,
    # never to the user's ~/.local/state, where a left-over token would change what a later run does.
    state = Path(session.config._tmp_path_factory.mktemp("client-state"))  # noqa: SLF001  (pytest's own factory)
    os.environ["FEDBPT_STATE_DIR"] = str(state)
    session.config._fedbpt_checkout_before = _checkout_files()
    session.config._fedbpt_home_before = _home_state_files()


def pytest_sessionfinish(session, exitstatus):
    """A run leaves nothing in the checkout or the user's state directory: every test writes under its own
    temporary directory."""
    before = getattr(session.config, "_fedbpt_checkout_before", None)
    after = _checkout_files()
    home = sorted(_home_state_files() - getattr(session.config, "_fedbpt_home_before", set()))
    written = []
    if before is not None and after is not None:
        written = sorted(p for p, t in after.items() if before.get(p) != t)
    left = home + written
    if left:
        session.config.pluginmanager.get_plugin("terminalreporter").write_line(
            f"FAILED: the test run left files behind: {', '.join(left[:10])}", red=True
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_collection_modifyitems(config, items):
    for item in items:
        role = Path(str(item.path)).parent.name
        if role in ROLES:
            item.add_marker(role)


# Examples per property: `fedbpt` in every run; `pytest -m fuzz --hypothesis-profile=fedbpt-long` (make test-fuzz)
# searches twenty times as far.
settings.register_profile("fedbpt", max_examples=50)
settings.register_profile("fedbpt-long", max_examples=1000)
settings.load_profile("fedbpt")


TINY_CORPUS = [
    "the movie was great and the actors were great",
    "the movie was bad and the plot was bad",
    "a great film with a great story",
    "a bad film with a bad ending",
    "it was great . it was bad . it was fine",
    "what a great day for a bad movie",
    "hello world , the story was long",
]


def build_tiny_roberta(out: Path) -> Path:
    """A random-init RoBERTa with a BPE tokenizer trained here: the real masked-LM loading path, offline."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        TINY_CORPUS * 20, vocab_size=400, min_frequency=2, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    )
    bpe.save_model(str(out))
    tokenizer = RobertaTokenizerFast.from_pretrained(out)
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=160,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        type_vocab_size=1,
    )
    RobertaForMaskedLM(config).save_pretrained(out)
    return out


def build_tiny_llama(out: Path) -> Path:
    """A random-init Llama with a locally trained BPE tokenizer that adds <s>: the BOS path of the layout."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    build_tiny_roberta(out)  # for its tokenizer files; the model below replaces its weights and config
    tokenizer = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_roberta_dir(tmp_path_factory) -> Path:
    return build_tiny_roberta(tmp_path_factory.mktemp("tiny-roberta"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from fedbpt_assets import ensure_model

    return ensure_model()


@pytest.fixture(scope="session")
def default_data_dir() -> Path:
    from fedbpt_assets import ensure_data

    return ensure_data()


def assert_no_5xx(response) -> None:
    """No 5xx; a rejection is a 4xx with a JSON `detail` string."""
    status = response.status_code
    assert status < 500, f"{status} {response.text[:500]}"
    if status >= 400:
        detail = response.json().get("detail")
        assert isinstance(detail, str) and detail, response.text[:500]
