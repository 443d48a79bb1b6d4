"""URL passwords are masked in text, log records (messages, arguments and tracebacks) and in
what the command line prints."""

from __future__ import annotations

import io
import logging

import pytest

from droptune.cli import main
from droptune.storage import MaskingFilter
from droptune.storage import mask_text
from droptune.storage import mask_url


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql+psycopg://u:pw@h:5432/db", "postgresql+psycopg://u:***@h:5432/db"),
        ("http://droptune:s3cret@127.0.0.1:5000", "http://droptune:***@127.0.0.1:5000"),
        ("mysql://root:p%40ss@db/x?charset=utf8", "mysql://root:***@db/x?charset=utf8"),
        (
            "from postgresql://a:one@h1/x to https://b:two@h2/api",
            "from postgresql://a:***@h1/x to https://b:***@h2/api",
        ),
        ("'postgresql://a:q@h/x'", "'postgresql://a:***@h/x'"),
        ("sqlite:///runs/study/droptune.db", "sqlite:///runs/study/droptune.db"),
        ("postgresql://user@host/db", "postgresql://user@host/db"),
        ("http://127.0.0.1:5000/#/experiments/1", "http://127.0.0.1:5000/#/experiments/1"),
        # raw @, / and # in a password (SQLAlchemy splits at the first @): masked whole
        ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:a@b#c@h:5432/db?x=1", "postgresql://u:***@h:5432/db?x=1"),
        ("http://mlflow:5000/x?owner=me@corp.com", "http://mlflow:5000/x?owner=me@corp.com"),
        # raw / and ? in a password, in free text too (an "unreachable" warning)
        ("at postgresql://u:pw/123@127.0.0.1:1/x", "at postgresql://u:***@127.0.0.1:1/x"),
        ("http://u:pw/123@127.0.0.1:1 is down", "http://u:***@127.0.0.1:1 is down"),
        ("postgresql://u:SECRET12?x@host/db", "postgresql://u:***@host/db"),
    ],
)
def test_mask_text(text: str, expected: str) -> None:
    assert mask_text(text) == expected


def test_mask_url_keeps_urls_without_password_and_masks_the_rest() -> None:
    assert mask_url("sqlite:///a.db") == "sqlite:///a.db"
    assert mask_url("postgresql+psycopg://u:pw@h/db") == "postgresql+psycopg://u:***@h/db"
    assert "pw" not in mask_url("http://u:pw@h:1")
    for url in ("postgresql://u:p@ssw0rd@h/db", "postgresql://u:p@ssw#0rd@h/db"):
        assert "ssw" not in mask_url(url) and mask_url(url).endswith("@h/db")
    assert mask_url("postgresql://u:p/w0rd@h/db") == "postgresql://u:***@h/db"
    # no password: a later @ (an e-mail in a query) is left alone, and the URL is stored as is
    plain = "http://mlflow:5000/x?owner=me@corp.com&user=admin@server"
    assert mask_url(plain) == plain


def test_masking_filter_masks_messages_arguments_and_tracebacks() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(MaskingFilter())
    logger = logging.getLogger("droptune.test-masking")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("storage %s unreachable", "postgresql://u:hunter2@h/db")
        try:
            raise RuntimeError("cannot connect to http://x:hunter2@127.0.0.1:9")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert "hunter2" not in out
    assert "postgresql://u:***@h/db" in out
    assert "RuntimeError: cannot connect to http://x:***@127.0.0.1:9" in out


def test_cli_never_prints_a_storage_password(capsys: pytest.CaptureFixture[str]) -> None:
    url = "postgresql+psycopg://postgres:hunter2@127.0.0.1:1/nowhere"
    assert main(["status", "--storage", url, "--study", "x"]) == 1  # unreachable: exit 1
    captured = capsys.readouterr()
    assert "hunter2" not in captured.out + captured.err
    assert "postgres:***@127.0.0.1:1" in captured.err
