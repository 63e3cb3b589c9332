"""Errors raised for bad input: one clear message naming the problem, never a deep traceback.

Besides the error classes, the checks here run before any model loads: ``check_alpha`` (used by every target,
policy and sampler), text files that must be UTF-8, output paths that must be writable, and the memory and disk
space a run of ``num_chains`` chains needs at least.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

ALPHA_MAX = 1e6
"""The largest power α accepted. α·log p(x) must stay finite and keep its resolution in float32 (policies scale
float32 log-probabilities) and float64 (targets): a token's log-probability is above about -1e4 in practice
(e^-1e4 is 0 in any float format) and a completion has at most about 1e5 tokens, so |α·log p| <= 1e6 · 1e9 =
1e15, far below float32's 3.4e38, and float64 still resolves 0.25 nats there. Larger α buys nothing: at α = 1e6,
p^α already puts all its mass on the mode unless two completions' log-probabilities differ by less than 1e-5
nats; α = 1e39 overflows float32 and α = 1e308 overflows float64 (α·log p = -inf, every move rejected)."""


class EGPSError(ValueError):
    """Bad input or an impossible request; the message says what to change."""


class ModelFileError(EGPSError):
    """A model file (Markov JSON, GGUF, checkpoint) is missing or malformed."""


class NumericalError(EGPSError):
    """A model produced NaN or infinite logits, or probabilities that are not a distribution."""


def check_alpha(alpha: float) -> float:
    """Return ``alpha`` as a float, or raise if it is not a number in (0, :data:`ALPHA_MAX`]."""
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise EGPSError(f"alpha must be a number, got {alpha!r}") from None
    if not value > 0 or value == float("inf"):
        raise EGPSError(f"alpha must be finite and > 0, got {alpha!r}")
    if value > ALPHA_MAX:
        raise EGPSError(
            f"alpha must be at most {ALPHA_MAX:g}, got {alpha!r}: beyond it alpha·log p overflows or loses its "
            f"resolution, and at {ALPHA_MAX:g} p^alpha already puts its mass on the mode"
        )
    return value


def check_positive_int(name: str, value: int) -> int:
    """Return ``value`` if it is an integer >= 1, else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EGPSError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def read_text(path: str | os.PathLike[str], what: str) -> str:
    """The contents of a UTF-8 text file, or an :class:`EGPSError` naming ``what`` and the file.

    Parameters
    ----------
    path : path
        The file.
    what : str
        How the message names it, e.g. ``"--init file"``.
    """
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise EGPSError(f"{what} {path} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8") from None
    except IsADirectoryError:
        raise EGPSError(f"{what} {path} is a directory, not a file") from None
    except OSError as exc:
        raise EGPSError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _existing_ancestor(path: Path) -> Path:
    """``path`` itself or its nearest ancestor that exists."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_writable(path: str | os.PathLike[str], what: str, *, directory: bool = False) -> Path:
    """Check, without creating anything, that ``path`` can be written: a file, or with ``directory`` a folder.

    A file path must not be a directory; a directory path must not be a file; the nearest existing folder on the
    way must take a new file (probed with a temporary file that is removed at once, so a read-only file system,
    missing permissions or an immutable folder are found before any work starts).

    Raises
    ------
    EGPSError
        Naming ``what``, the path and the reason.
    """
    path = Path(path)
    if directory and path.exists() and not path.is_dir():
        raise EGPSError(f"{what} {path} is a file; pass a directory")
    if not directory and path.is_dir():
        raise EGPSError(f"{what} {path} is a directory; pass a file name")
    folder = _existing_ancestor(path if directory else path.parent)
    if not folder.is_dir():
        raise EGPSError(f"{what} {path}: {folder} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".egps-probe-", dir=folder)
    except OSError as exc:
        raise EGPSError(f"cannot write {what} {path}: {exc.strerror or exc} ({folder})") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return path


def check_disk_space(path: str | os.PathLike[str], needed: int, what: str, detail: str = "") -> None:
    """Raise when the file system of ``path`` (or its nearest existing folder) has less than ``needed`` bytes free.

    Writing a NetCDF file on a full disk can crash the HDF5 library outright, so the space is checked first.
    """
    folder = _existing_ancestor(Path(path))
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # nothing to go on: let the write itself report
    if needed > free:
        extra = f" ({detail})" if detail else ""
        raise EGPSError(
            f"{what} needs about {format_bytes(needed)} on disk{extra}, but {folder} has {format_bytes(free)} free; "
            f"free some space or write elsewhere"
        )


def available_memory(device: str = "cpu") -> tuple[int, str] | None:
    """``(bytes, source)``: memory a new allocation can still get on ``device``; ``None`` when unknown.

    On the CPU the smallest of psutil's ``available`` (else ``MemAvailable`` of ``/proc/meminfo``, else
    ``os.sysconf('SC_AVPHYS_PAGES')``) and the room left under a cgroup v2 ``memory.max``; on a CUDA device the
    free memory ``torch.cuda.mem_get_info`` reports.
    """
    if str(device).startswith("cuda"):
        try:
            import torch

            free, _ = torch.cuda.mem_get_info(torch.device(device))
            return int(free), f"free on {device}"
        except Exception:
            return None
    if str(device) != "cpu":
        return None
    found: list[tuple[int, str]] = []
    try:
        import psutil

        found.append((int(psutil.virtual_memory().available), "available RAM"))
    except Exception:
        with contextlib.suppress(OSError, ValueError, StopIteration):
            with open("/proc/meminfo", encoding="ascii") as fh:
                line = next(line for line in fh if line.startswith("MemAvailable:"))
            found.append((int(line.split()[1]) * 1024, "available RAM"))
        if not found:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                found.append((os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free RAM"))
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            found.append((max(0, int(limit) - used), "left under the cgroup memory limit"))
    return min(found) if found else None


def check_memory(needed: int, what: str, explanation: str, device: str = "cpu") -> None:
    """Raise when ``needed`` bytes (a lower bound, explained by ``explanation``) exceed :func:`available_memory`.

    Callers pass a conservative estimate (what the run needs at least), so a run that is refused could not have
    finished; nothing is refused when the available memory is unknown.
    """
    available = available_memory(device)
    if available is not None and needed > available[0]:
        raise EGPSError(
            f"{what} needs at least {format_bytes(needed)} of memory ({explanation}), but {device} has "
            f"{format_bytes(available[0])} ({available[1]}); use fewer chains, samples or tokens"
        )


def format_bytes(count: float) -> str:
    """``count`` bytes as ``"1.2 GB"`` (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def chain_memory(num_chains: int, tokens: int, draws: int = 1, vocab_size: int = 0) -> tuple[int, str]:
    """A lower bound on the memory ``num_chains`` chains of ``tokens`` tokens need, and how it was counted.

    Counted: the chain state (a token id and four float64 statistics per chain and position: 40 bytes) three
    times over (the state, a proposal and their merge); each recorded draw (token id, log-probability and entropy
    per position, 24 bytes, plus 80 bytes of per-draw statistics) twice (the record and its ArviZ export); with
    ``vocab_size``, one float32 next-token distribution per chain twice over (logits and log-probabilities).
    Model weights, KV caches and temporaries come on top, so a run refused on this count cannot fit.

    Returns
    -------
    (int, str)
        The bytes and a one-line explanation for error messages.
    """
    state = num_chains * tokens * 40 * 3
    recorded = num_chains * draws * (tokens * 24 + 80) * 2
    logits = num_chains * vocab_size * 4 * 2
    explanation = (
        f"{format_bytes(state)} for the chain states at 40 B per chain and token, x3 for proposals, and "
        f"{format_bytes(recorded)} for {draws} recorded draw(s) per chain"
    )
    if vocab_size:
        explanation += f" and {format_bytes(logits)} for next-token distributions over {vocab_size} tokens"
    return state + recorded + logits, explanation
