"""The best-checkpoint mark: ``<output_dir>/checkpoints/.ckptd-best.json``, one small JSON file.

Which checkpoint is the best is one record in one file, replaced by an atomic rename (temp file, fsync,
rename over, fsync the directory), so a crash at any instant leaves the old mark or the new one: never two
bests, never a half-written one, never a choice by mtime. Only the daemon writes it, in the same serial
commit pool that commits and applies retention, so retention always sees the mark it must keep.

A mark that names a checkpoint that is gone (deleted by hand) names no best: :func:`find_best_checkpoint`
returns None and the next save with a metric becomes the best.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from ckptd.format.errors import FormatError
from ckptd.format.names import BEST_NAME, best_temp_name, checkpoint_dirname, checkpoints_root, is_best_temp_name

MAX_MARK_BYTES = 64 * 1024


@dataclass(frozen=True)
class BestMark:
    """The best checkpoint of an output dir.

    Attributes:
        step: its step (``checkpoint-<step>``).
        metric: the metadata key it was chosen by, or None when it was marked explicitly.
        value: that key's value in its metadata, or None when marked explicitly.
        greater_is_better: the direction the value was compared in.
    """

    step: int
    metric: str | None = None
    value: float | None = None
    greater_is_better: bool = False

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "step": self.step,
                "metric": self.metric,
                "value": self.value,
                "greater_is_better": self.greater_is_better,
            },
            allow_nan=False,
        ).encode()


def metric_value(metadata: dict, metric: str) -> float | None:
    """``metadata[metric]`` as a finite float, or None when it is missing or not a finite number.

    Example:
        >>> metric_value({"eval_loss": 0.5}, "eval_loss")
        0.5
    """
    v = metadata.get(metric)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def is_better(value: float, than: float, greater_is_better: bool) -> bool:
    """Whether ``value`` beats ``than`` (a tie keeps the earlier best)."""
    return value > than if greater_is_better else value < than


def read_best_mark(output_dir: str | os.PathLike) -> BestMark | None:
    """The mark of ``output_dir``, or None when there is none.

    Raises:
        FormatError: the mark exists but is not a regular file of valid content (it names what is wrong).

    Example:
        >>> read_best_mark("/runs/exp1")  # doctest: +SKIP
        BestMark(step=40, metric='eval_loss', value=0.31, greater_is_better=False)
    """
    path = checkpoints_root(output_dir) / BEST_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise FormatError(f"{path}: cannot open the best-checkpoint mark ({e}); remove it and mark one again") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_MARK_BYTES:
            found = f"a file of {st.st_size} bytes" if stat.S_ISREG(st.st_mode) else _kind(st.st_mode)
            raise FormatError(
                f"{path}: expected a small regular file (the best-checkpoint mark), found {found}; the "
                "checkpoints are not affected: remove it and mark the best again (client.set_best_checkpoint)"
            )
        data = os.read(fd, MAX_MARK_BYTES + 1)
    finally:
        os.close(fd)
    try:
        doc = json.loads(data, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise FormatError(
            f"{path}: the best-checkpoint mark is not valid JSON ({e}); the checkpoints are not affected: remove "
            "it and mark the best again (client.set_best_checkpoint), or let the next save with best_metric do it"
        ) from None
    step = doc.get("step") if isinstance(doc, dict) else None
    metric = doc.get("metric") if isinstance(doc, dict) else None
    value = doc.get("value") if isinstance(doc, dict) else None
    greater = doc.get("greater_is_better", False) if isinstance(doc, dict) else None
    if (
        isinstance(step, bool)
        or not isinstance(step, int)
        or step < 0
        or (metric is not None and not isinstance(metric, str))
        or (value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))))
        or (value is not None and not math.isfinite(value))
        or not isinstance(greater, bool)
    ):
        raise FormatError(
            f"{path}: expected {{'step': int >= 0, 'metric': str|null, 'value': number|null, "
            f"'greater_is_better': bool}}, got {data[:200]!r}; remove it and mark the best again"
        )
    return BestMark(step, metric, None if value is None else float(value), greater)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number the daemon writes")


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "something that is not a regular file"


def write_best_mark(output_dir: str | os.PathLike, mark: BestMark) -> None:
    """Replace the mark atomically and durably. Leftover temp files of killed writers are removed first."""
    root = checkpoints_root(output_dir)
    for name in os.listdir(root):
        if is_best_temp_name(name):
            with contextlib.suppress(OSError):
                os.unlink(root / name)
    tmp = root / best_temp_name(secrets.token_hex(8))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        try:
            data = mark.to_bytes()
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, root / BEST_NAME)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def best_checkpoint_path(output_dir: str | os.PathLike, mark: BestMark) -> Path:
    return checkpoints_root(output_dir) / checkpoint_dirname(mark.step)


def find_best_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The committed checkpoint marked best in ``output_dir``, or None (no mark, or it names a checkpoint
    that is not committed any more).

    Args:
        output_dir: the training output dir.

    Raises:
        FormatError: the mark is damaged (the message says what to do).

    Example:
        >>> find_best_checkpoint("/runs/exp1")  # doctest: +SKIP
        PosixPath('/runs/exp1/checkpoints/checkpoint-40')
    """
    from ckptd.format.reading import survey_checkpoints

    mark = read_best_mark(output_dir)
    if mark is None:
        return None
    for info in survey_checkpoints(output_dir).found:
        if info.step == mark.step:
            return info.path
    return None
