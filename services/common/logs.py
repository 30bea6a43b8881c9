"""Loguru setup shared by every service and job: readable lines on stderr, optionally a file too."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from loguru import logger

FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {extra[component]: <12} | {message}"


class _ToLoguru(logging.Handler):
    """Routes the standard logging of libraries (grpc, transformers, ray) into loguru."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).log(level, record.getMessage())


def setup_logging(component: str, level: str = "INFO", log_file: Path | None = None) -> None:
    logger.remove()
    logger.configure(extra={"component": component})
    logger.add(sys.stderr, level=level.upper(), format=FORMAT, backtrace=False, diagnose=False)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        logger.add(log_file, level=level.upper(), format=FORMAT, rotation="50 MB", retention=3, diagnose=False)
    logging.basicConfig(handlers=[_ToLoguru()], level=logging.WARNING, force=True)
