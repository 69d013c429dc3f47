"""Secrets never reach an output or a log line: the values of secret-looking environment
variables are replaced by ``***`` in text (:func:`redact`) and in every log record
(:func:`install_log_redaction`). Defence in depth: configs hold no secrets in the first place.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Mapping

SECRET_ENV_NAMES = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HUGGINGFACE_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "GOOGLE_APPLICATION_CREDENTIALS_JSON",
    "AZURE_STORAGE_KEY",
    "WANDB_API_KEY",
    "RAY_AUTH_TOKEN",
)
SECRET_NAME = re.compile(
    r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIALS?)(_|$)", re.IGNORECASE
)
_MIN_SECRET_LEN = 6
REDACTED = "***"


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of environment variables that look like secrets, longest first."""
    env = os.environ if environ is None else environ
    values = {
        value
        for name, value in env.items()
        if (name in SECRET_ENV_NAMES or SECRET_NAME.search(name)) and len(value) >= _MIN_SECRET_LEN
    }
    return sorted(values, key=len, reverse=True)


def redact(text: str, environ: Mapping[str, str] | None = None) -> str:
    """``text`` with every secret environment value replaced by ``***``."""
    for value in secret_values(environ):
        text = text.replace(value, REDACTED)
    return text


def install_log_redaction() -> None:
    """Redact secret values from every log record created from now on, in this process (idempotent).

    Wraps the logging record factory, so it covers every logger and handler (lensray's, Ray's,
    transformers'), whatever the logging configuration. Call it early in drivers and workers.
    """
    factory = logging.getLogRecordFactory()
    if getattr(factory, "_lensray_redacting", False):
        return

    def redacting_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        if secret_values():
            message = record.getMessage()
            cleaned = redact(message)
            if cleaned != message:
                record.msg, record.args = cleaned, None
        return record

    redacting_factory._lensray_redacting = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(redacting_factory)
