"""Storage URLs: what a study's storage and tracking URLs may be, and how they are shown.

Every credential form SQLAlchemy and MLflow accept (``user:password@`` userinfo, ``password=``
query or DSN parameters, the clients' environment variables) is masked in whatever droptune
prints, logs or records; a study name is checked before it becomes part of a path.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
import re
from typing import Any

from droptune.exceptions import SpecError


_DRIVERS = ("sqlite", "postgresql", "mysql")


#: What a password is shown as.
MASK = "***"
#: The password of ``scheme://user:password@host``: everything up to the *last* ``@`` of the
#: URL, so that a raw ``@``, ``#``, ``/`` or ``?`` in a password (which parsers split at) is
#: masked whole; but not ``host:port/...`` (a numeric port after the colon), whose later
#: ``@`` (an e-mail in a query) is no password. Bounded, so a long line costs linear time.
_PASSWORD_IN_URL = re.compile(
    r"(\b[A-Za-z][\w+.-]*://[^:/@\s'\"]{0,256}:)(?!\d{1,5}(?:[/?#\s'\"]|$))"
    r"([^\s'\"]{1,256})(@)"
)


#: Query or DSN parameters that carry a credential (``?password=...``, libpq's
#: ``password=... sslpassword=...``, tokens).
_SECRET_PARAM = re.compile(
    r"((?:^|[?&;\s])(?:password|passwd|pwd|sslpassword|secret|token|access_token|api_key)=)"
    r"([^&;\s'\"#]+)",
    re.IGNORECASE,
)
#: Environment variables whose values are credentials the database and MLflow clients read.
SECRET_ENV = (
    "PGPASSWORD",
    "POSTGRES_PASSWORD",
    "MYSQL_PWD",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "DATABRICKS_TOKEN",
    "AWS_SECRET_ACCESS_KEY",
)
#: Shorter environment values are not masked in free text (too likely to occur by chance).
_MIN_SECRET = 6


def _mask_credentials(text: str) -> str:
    """The password of each ``scheme://user:password@host`` URL and credential query/DSN
    parameters (``?password=...``) masked."""
    text = _PASSWORD_IN_URL.sub(rf"\g<1>{MASK}\g<3>", text)
    return _SECRET_PARAM.sub(rf"\g<1>{MASK}", text)


def mask_text(text: str) -> str:
    """Free text (a log line, an error) with every credential in it masked: those of URLs
    (:func:`mask_url`'s) and the values of the credential environment variables
    (:data:`SECRET_ENV`) wherever they appear."""
    text = _mask_credentials(text)
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= _MIN_SECRET:
            text = text.replace(value, MASK)
    return text


class MaskingFilter(logging.Filter):
    """Masks URL passwords in every log record that passes through a handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_text(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and record.exc_info[1] is not None:
            import traceback

            record.exc_text = mask_text("".join(traceback.format_exception(*record.exc_info)))
            record.exc_info = None
            record.msg = f"{record.msg}\n{record.exc_text}"
            record.exc_text = None
        return True


def mask_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (safe for logs, tags and messages). A
    database URL is also read as SQLAlchemy reads it (it connects with what it parses)."""
    if not url.lower().startswith(("http://", "https://")):
        try:
            from sqlalchemy.engine import make_url

            parsed = make_url(url)
            if parsed.password is not None:
                url = parsed.render_as_string(hide_password=True)
        except Exception:
            pass
    # not the environment's values: a masked URL is stored (the study's tracking URI) and a
    # password that happens to be a word of a path must not change it
    return _mask_credentials(url)


def check_url(url: str, field: str = "storage") -> None:
    """Raise SpecError unless ``url`` parses as an SQLAlchemy URL of a supported backend."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:
        raise SpecError(
            f"{field}: not a valid SQLAlchemy URL: {mask_url(url)!r}; examples: "
            "sqlite:///runs/study.db, postgresql+psycopg://user@host/db"
        ) from None
    if parsed.get_backend_name() not in _DRIVERS:
        raise SpecError(
            f"{field}: unsupported backend {parsed.get_backend_name()!r}; allowed: "
            f"{', '.join(_DRIVERS)}"
        )
    _check_driver(parsed, field)


#: Database drivers by SQLAlchemy dialect name, with what installs them.
_DRIVER_PACKAGES = {
    "psycopg": ("psycopg", "pip install 'droptune[postgres]'"),
    "psycopg2": ("psycopg2", "pip install psycopg2-binary, or use postgresql+psycopg:// with "
                 "pip install 'droptune[postgres]'"),
    "pymysql": ("pymysql", "pip install pymysql"),
    "mysqldb": ("MySQLdb", "pip install mysqlclient"),
}  # fmt: skip


def _check_driver(parsed: Any, field: str) -> None:
    """SpecError when the URL's database driver is not installed (saying what installs it),
    instead of an import error deep in SQLAlchemy."""
    import importlib.util

    if parsed.get_backend_name() == "sqlite":
        return
    try:
        driver = parsed.get_dialect().driver
    except Exception:  # SQLAlchemy imports the driver's dialect module lazily
        driver = parsed.get_driver_name()
    module, install = _DRIVER_PACKAGES.get(driver, (None, ""))
    if module is not None and importlib.util.find_spec(module) is None:
        raise SpecError(
            f"{field}: the {parsed.drivername!r} driver ({module}) is not installed: {install}"
        )


#: What a study name may be: it names the folder ``runs/<study>/`` too, so no path
#: separator, no leading dot (``..``), nothing a shell or a URL would mangle.
STUDY_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}$"


def check_study_name(name: str, field: str = "study.name") -> str:
    """``name`` if it is a valid study name, else SpecError naming ``field``: every way a
    study name arrives (the spec, ``--study-name``, ``--study``, a ``STUDY`` argument) goes
    through here before it becomes part of a path."""

    if not isinstance(name, str) or not re.fullmatch(STUDY_NAME_PATTERN, name):
        raise SpecError(
            f"{field}: {name!r} is not a study name; use 1-200 letters, digits, '_', '.' or "
            "'-', starting with a letter or digit (it names the folder runs/<study>/)"
        )
    return name


def default_url(study_name: str, root: Path = Path("runs")) -> str:
    """``sqlite:///runs/<study>/droptune.db``."""
    check_study_name(study_name)
    return f"sqlite:///{root / study_name / 'droptune.db'}"
