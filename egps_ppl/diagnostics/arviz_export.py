"""Export MCMC draws to ArviZ and read/write them as NetCDF (the ``RUN.nc`` contract).

``posterior`` holds ``tokens[chain, draw, position]`` (int64, padded with -1), ``length[chain, draw]`` and
``log_p[chain, draw]``; ``sample_stats`` holds ``lp``, ``acceptance_rate``, ``is_accepted``, ``cut_position``,
``decode_tokens``, ``scored_tokens`` and any further per-draw statistic, and, where the run recorded them (the
MCMC runner does), the per-position ``token_logp[chain, draw, position]`` (log p(x_t | x_<t)) and
``entropy[chain, draw, position]`` (entropy of p(. | x_<t), nats), float64 with NaN past each draw's length.
They sit in ``sample_stats``, not ``posterior``, so that ``arviz.summary`` and the plots of the posterior do not
compute a diagnostic for every position. Run attributes go on both groups.

Supported ArviZ: 0.2x (>= 0.20) and 1.x (tested with 1.3). With ArviZ < 1.0 the container is an
:class:`arviz.InferenceData`; with ArviZ >= 1.0 it is an :class:`xarray.DataTree` (ArviZ 1.x's data structure).
Only :func:`uses_datatree`, :func:`_make_container` and :func:`_is_inference_data` look at the version;
everything else goes through :func:`group_dataset`. Files are read and written with h5netcdf and h5py (declared
dependencies of egps_ppl: ArviZ 1.x no longer installs h5py).
"""

from __future__ import annotations

import datetime
import json
import os
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from egps_ppl.errors import EGPSError

with warnings.catch_warnings():
    # ArviZ 0.2x warns about its coming refactor on import; CLI users cannot act on that.
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

__all__ = [
    "PAD",
    "POSITION_STATS",
    "POSTERIOR_DTYPES",
    "SAMPLE_STATS_DTYPES",
    "group_dataset",
    "group_names",
    "load_netcdf",
    "posterior_dataset",
    "save_netcdf",
    "select_problem",
    "to_arviz",
    "uses_datatree",
]

PAD = -1
"""Token id past a sequence's end; equals ``egps_ppl.state.PAD`` (not imported, to keep torch out of here)."""

POSTERIOR_DTYPES: dict[str, type] = {"tokens": np.int64, "length": np.int64, "log_p": np.float64}
"""Required posterior variables and the dtype each is stored with."""

SAMPLE_STATS_DTYPES: dict[str, type] = {
    "lp": np.float64,
    "acceptance_rate": np.float64,
    "is_accepted": np.bool_,
    "cut_position": np.int64,
    "decode_tokens": np.int64,
    "scored_tokens": np.int64,
}
"""Required sample statistics and their dtypes; other [chain, draw, ...] arrays pass through unchanged."""

POSITION_STATS: tuple[str, ...] = ("token_logp", "entropy")
"""Optional per-position sample statistics ``[chain, draw, position]``: stored as float64 on the ``position``
dimension of ``tokens``, NaN at and past each draw's ``length``."""

_ENGINE = "h5netcdf"


# --------------------------------------------------------------------------- container choice (version-aware)
def uses_datatree() -> bool:
    """Return True when the installed ArviZ (>= 1.0) works on :class:`xarray.DataTree` instead of InferenceData."""
    from packaging.version import Version

    # ``release`` ignores dev/pre-release tags, so "1.0.0.dev0" already counts as 1.x.
    return Version(az.__version__).release[0] >= 1


def _make_container(groups: Mapping[str, xr.Dataset], attrs: Mapping[str, Any] | None = None) -> Any:
    """Wrap named group datasets in the container that the installed ArviZ expects."""
    if uses_datatree():
        tree = xr.DataTree.from_dict(dict(groups))
        tree.attrs = dict(attrs or {})
        return tree
    return az.InferenceData(attrs=dict(attrs or {}), **groups)


# --------------------------------------------------------------------------- reading groups from either container
def _is_datatree(data: Any) -> bool:
    datatree = getattr(xr, "DataTree", None)  # xarray >= 2024.10
    return datatree is not None and isinstance(data, datatree)


def _is_inference_data(data: Any) -> bool:
    """True for an ArviZ 0.x InferenceData, never for a DataTree.

    Since ArviZ 1.1, ``az.InferenceData`` is ``xarray.DataTree`` itself (with a MigrationWarning), so the
    DataTree test must come first, and the name is looked up only on ArviZ 0.x.
    """
    if _is_datatree(data) or uses_datatree():
        return False
    inference_data = getattr(az, "InferenceData", None)
    return inference_data is not None and isinstance(data, inference_data)


def group_names(data: Any) -> list[str]:
    """Return the group names of an InferenceData or DataTree (e.g. ``["posterior", "sample_stats"]``)."""
    if _is_datatree(data):
        return list(data.children)
    if _is_inference_data(data):
        return list(data.groups())
    raise EGPSError(f"expected ArviZ InferenceData or xarray DataTree, got {type(data).__name__}")


def group_dataset(data: Any, group: str) -> xr.Dataset:
    """Return one group of an InferenceData or DataTree as an :class:`xarray.Dataset`.

    Parameters
    ----------
    data
        :class:`arviz.InferenceData`, :class:`xarray.DataTree`, or an :class:`xarray.Dataset` (returned as is).
    group
        Group name, e.g. ``"posterior"`` or ``"sample_stats"``.

    Raises
    ------
    EGPSError
        If the container has no such group.
    """
    if isinstance(data, xr.Dataset):
        return data
    names = group_names(data)
    if group not in names:
        raise EGPSError(f"the data has no {group!r} group (groups: {', '.join(names) or 'none'})")
    if _is_datatree(data):
        return data[group].to_dataset()
    return data[group]


def posterior_dataset(data: Any) -> xr.Dataset:
    """Return the ``posterior`` group as an :class:`xarray.Dataset` (see :func:`group_dataset`)."""
    return group_dataset(data, "posterior")


# --------------------------------------------------------------------------- building the groups
def _netcdf_attr(value: Any) -> str | int | float:
    """Convert one attribute to a type NetCDF can store (str or number), keeping it machine-readable."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, str) or (isinstance(value, int | float) and not isinstance(value, bool)):
        return value
    if isinstance(value, np.ndarray):
        value = value.tolist()
    try:
        # bool -> "true", None -> "null", lists/dicts -> JSON, so they can be parsed back.
        return json.dumps(value)
    except TypeError:
        return str(value)


def _run_attrs(attrs: Mapping[str, Any] | None) -> dict[str, str | int | float]:
    out: dict[str, str | int | float] = {
        "created_at": datetime.datetime.now(datetime.UTC).isoformat(),
        "arviz_version": az.__version__,
        "inference_library": "egps_ppl",
    }
    for key, value in (attrs or {}).items():
        out[str(key)] = _netcdf_attr(value)
    return out


def _cast(name: str, values: Any, dtype: type) -> np.ndarray:
    """Cast to the contract dtype, refusing casts that would change values (e.g. 0.5 -> 0)."""
    array = np.asarray(values)
    if dtype is np.float64:
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
            raise EGPSError(f"{name} must be numeric, got dtype {array.dtype}")
        return array.astype(np.float64)
    exact = array.dtype == np.bool_ or np.issubdtype(array.dtype, np.integer)
    whole_floats = np.issubdtype(array.dtype, np.floating) and np.all(np.isfinite(array) & (array == np.round(array)))
    if not (exact or whole_floats):
        raise EGPSError(f"{name} must hold integers, got dtype {array.dtype}")
    if dtype is np.bool_ and not np.all((array == 0) | (array == 1)):
        raise EGPSError(f"{name} must be boolean (0/1)")
    return array.astype(dtype)


def _require(group: str, arrays: Mapping[str, Any], required: Mapping[str, type]) -> None:
    missing = [name for name in required if name not in arrays]
    if missing:
        raise EGPSError(f"{group} is missing {', '.join(missing)} (required: {', '.join(required)})")


def _variable(name: str, array: np.ndarray, chain_draw: tuple[int, int], extra_dims: tuple[str, ...] = ()) -> Any:
    """Return ``(dims, array)`` for a [chain, draw, ...] array, checking its leading shape."""
    if array.shape[:2] != chain_draw:
        raise EGPSError(f"{name} has shape {array.shape}, expected [chain, draw, ...] = {chain_draw}")
    trailing = array.ndim - 2
    if not extra_dims:
        # ArviZ's own naming for unnamed trailing dimensions.
        extra_dims = tuple(f"{name}_dim_{i}" for i in range(trailing))
    return (("chain", "draw", *extra_dims), array)


def _posterior(posterior: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[int, int, int]]:
    _require("posterior", posterior, POSTERIOR_DTYPES)
    tokens = _cast("tokens", posterior["tokens"], np.int64)
    if tokens.ndim != 3:
        raise EGPSError(f"tokens must be [chain, draw, position], got shape {tokens.shape}")
    n_chain, n_draw, n_pos = tokens.shape
    if n_chain < 1 or n_draw < 1:
        raise EGPSError(f"need at least one chain and one draw, got tokens of shape {tokens.shape}")
    length = _cast("length", posterior["length"], np.int64)
    if length.size and (length.min() < 0 or length.max() > n_pos):
        raise EGPSError(f"length must lie in [0, {n_pos}] (the position dimension of tokens)")
    variables = {
        "tokens": _variable("tokens", tokens, (n_chain, n_draw), ("position",)),
        "length": _variable("length", length, (n_chain, n_draw)),
    }
    for name, values in posterior.items():
        if name not in variables:
            array = _cast(name, values, POSTERIOR_DTYPES[name]) if name in POSTERIOR_DTYPES else np.asarray(values)
            variables[name] = _variable(name, array, (n_chain, n_draw))
    return variables, (n_chain, n_draw, n_pos)


def _position_stat(name: str, values: Any, length: np.ndarray, n_pos: int) -> Any:
    """A [chain, draw, position] statistic as float64 on the ``position`` dimension, NaN past each length."""
    array = _cast(name, values, np.float64)
    if array.shape != (*length.shape, n_pos):
        raise EGPSError(f"{name} has shape {array.shape}, expected [chain, draw, position] = {(*length.shape, n_pos)}")
    padded = np.where(np.arange(n_pos) < length[..., None], array, np.nan)
    return (("chain", "draw", "position"), padded)


def _sample_stats(
    sample_stats: Mapping[str, Any], chain_draw: tuple[int, int], length: np.ndarray, n_pos: int
) -> dict[str, Any]:
    _require("sample_stats", sample_stats, SAMPLE_STATS_DTYPES)
    variables = {}
    for name, values in sample_stats.items():
        if name in POSITION_STATS:
            variables[name] = _position_stat(name, values, length, n_pos)
            continue
        dtype = SAMPLE_STATS_DTYPES.get(name)
        array = _cast(name, values, dtype) if dtype is not None else np.asarray(values)
        variables[name] = _variable(name, array, chain_draw)
    return variables


def _observed(observed: Mapping[str, Any]) -> dict[str, Any]:
    # Observed data has no chain/draw dimensions (e.g. the prompt's token ids).
    variables = {}
    for name, values in observed.items():
        array = np.asarray(values)
        variables[name] = (tuple(f"{name}_dim_{i}" for i in range(array.ndim)), array)
    return variables


def _split_problems(dims: tuple[str, ...], array: np.ndarray, problems: int) -> tuple[tuple[str, ...], np.ndarray]:
    """``[P·C, draw, ...]`` (problem-major rows) as ``[C, draw, P, ...]`` with the dimension names to match."""
    rows, rest = array.shape[0], array.shape[1:]
    split = array.reshape(problems, rows // problems, *rest)
    return ("chain", "draw", "problem", *dims[2:]), np.moveaxis(split, 0, 2)


def select_problem(data: Any, problem: int) -> Any:
    """The run of one problem of a multi-prompt run (every group with ``problem`` selected), in the same container
    type; data without a ``problem`` dimension is returned as it is.

    Parameters
    ----------
    data
        :class:`arviz.InferenceData` or :class:`xarray.DataTree` from :func:`to_arviz`.
    problem
        The problem's index.

    Returns
    -------
    arviz.InferenceData or xarray.DataTree
    """
    names = group_names(data)
    if "problem" not in group_dataset(data, names[0]).dims:
        return data
    groups = {}
    for name in names:
        ds = group_dataset(data, name)
        groups[name] = ds.isel(problem=problem).drop_vars("problem", errors="ignore") if "problem" in ds.dims else ds
    return _make_container(groups, dict(group_dataset(data, names[0]).attrs))


def to_arviz(
    posterior: Mapping[str, Any],
    sample_stats: Mapping[str, Any],
    attrs: Mapping[str, Any] | None = None,
    observed: Mapping[str, Any] | None = None,
    problems: int | None = None,
) -> Any:
    """Build the ArviZ container for one MCMC run.

    Parameters
    ----------
    posterior
        ``tokens`` int [chain, draw, position] padded with -1, ``length`` int [chain, draw], ``log_p`` float
        [chain, draw]; further [chain, draw, ...] arrays are kept.
    sample_stats
        ``lp``, ``acceptance_rate``, ``is_accepted``, ``cut_position``, ``decode_tokens``, ``scored_tokens``,
        each [chain, draw]; optionally ``token_logp`` and ``entropy`` [chain, draw, position] (see
        :data:`POSITION_STATS`; values at and past each draw's length are replaced by NaN); further
        [chain, draw, ...] arrays are kept with their own dtype.
    attrs
        Run attributes (alpha, kernel, model, seed, ...). Stored on both groups; values that NetCDF cannot hold
        (bool, None, lists) are stored as JSON strings.
    observed
        Optional arrays without chain/draw dimensions (e.g. prompt ids), stored as ``observed_data``.
    problems
        For a run over several prompts: the number of problems ``P``. The leading dimension of every array then
        holds ``P × C`` rows, problem-major (the rows of problem ``k`` are ``k·C .. k·C + C - 1``), and every
        variable gets the dimensions ``chain`` (``C``), ``draw``, ``problem`` (``P``), then its own, so ArviZ's
        R-hat and ESS come out per problem.

    Returns
    -------
    arviz.InferenceData or xarray.DataTree
        InferenceData with ArviZ < 1.0, DataTree (groups ``posterior``, ``sample_stats``) with ArviZ >= 1.0.
        Dimensions are ``chain``, ``draw``, ``position`` with integer coordinates from 0.

    Raises
    ------
    EGPSError
        If a required variable is missing, has the wrong shape, or cannot be cast to its dtype losslessly.
    """
    post_vars, (n_chain, n_draw, n_pos) = _posterior(posterior)
    stats_vars = _sample_stats(sample_stats, (n_chain, n_draw), post_vars["length"][1], n_pos)
    run_attrs = _run_attrs(attrs)
    coords = {"chain": np.arange(n_chain), "draw": np.arange(n_draw)}
    if problems is not None:
        if isinstance(problems, bool) or not isinstance(problems, int) or problems < 1 or n_chain % problems:
            raise EGPSError(f"{n_chain} rows do not split into {problems} problems of equal chains")
        post_vars = {name: _split_problems(dims, array, problems) for name, (dims, array) in post_vars.items()}
        stats_vars = {name: _split_problems(dims, array, problems) for name, (dims, array) in stats_vars.items()}
        coords = {"chain": np.arange(n_chain // problems), "draw": np.arange(n_draw), "problem": np.arange(problems)}
    stats_coords = {**coords, "position": np.arange(n_pos)} if any(n in stats_vars for n in POSITION_STATS) else coords
    groups = {
        "posterior": xr.Dataset(post_vars, coords={**coords, "position": np.arange(n_pos)}, attrs=run_attrs),
        "sample_stats": xr.Dataset(stats_vars, coords=stats_coords, attrs=run_attrs),
    }
    if observed:
        groups["observed_data"] = xr.Dataset(_observed(observed), attrs=run_attrs)
    return _make_container(groups, run_attrs)


# --------------------------------------------------------------------------- NetCDF I/O
def _backend_error(action: str, path: Path, err: ImportError) -> EGPSError:
    return EGPSError(
        f"cannot {action} {path}: the NetCDF backend is missing ({err}); install it with `pip install h5netcdf h5py`"
    )


def _require_backend(action: str, path: Path) -> None:
    """Raise the toolkit's one-line error, not a bare ImportError, when h5netcdf or h5py is not installed."""
    try:
        import h5netcdf  # noqa: F401
        import h5py  # noqa: F401
    except ImportError as err:
        raise _backend_error(action, path, err) from err


def _compression(data: Any) -> dict[str, dict[str, dict[str, Any]]]:
    """zlib encoding for every numeric variable of every group (token arrays compress well)."""
    encoding = {}
    for name in group_names(data):
        ds = group_dataset(data, name)
        encoding[f"/{name}"] = {
            var: {"zlib": True} for var, values in ds.variables.items() if values.dtype.kind in "biuf"
        }
    return encoding


def _write(data: Any, path: Path) -> None:
    if _is_inference_data(data):
        data.to_netcdf(str(path), engine=_ENGINE)
    else:
        data.to_netcdf(path, mode="w", engine=_ENGINE, encoding=_compression(data))


def _fsync(path: Path) -> None:
    # Without this a crash soon after os.replace can leave a complete-looking name over empty blocks.
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def save_netcdf(data: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``data`` to ``path`` as NetCDF atomically.

    The file is written to a temporary name in the same folder and moved over ``path`` with
    :func:`os.replace`, so ``path`` is either the old file or the complete new one, never half-written.

    Parameters
    ----------
    data
        :class:`arviz.InferenceData` or :class:`xarray.DataTree` (e.g. from :func:`to_arviz`).
    path
        Target file; missing parent folders are created.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    EGPSError
        If ``data`` is not a supported container, the NetCDF backend (h5netcdf, h5py) is not installed, or the
        write fails; then ``path`` is left as it was and the temporary file is removed.
    """
    group_names(data)  # rejects unsupported containers before touching the disk
    target = Path(path)
    _require_backend("write", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        _write(data, tmp)
        _fsync(tmp)
        os.replace(tmp, target)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, Exception) and not isinstance(err, EGPSError):
            raise EGPSError(f"could not write {target}: {err}") from err
        raise
    return target


def _read(path: Path) -> Any:
    if uses_datatree():
        with xr.open_datatree(path, engine=_ENGINE) as tree:
            groups = {name: child.to_dataset().load() for name, child in tree.children.items()}
            attrs = dict(tree.attrs)
        return _make_container(groups, attrs)
    # Eager load: a lazily opened file would keep a handle on a file that the next save may replace.
    with az.rc_context({"data.load": "eager"}):
        return az.from_netcdf(str(path), engine=_ENGINE)


def load_netcdf(path: str | os.PathLike[str]) -> Any:
    """Read a run written by :func:`save_netcdf`.

    Parameters
    ----------
    path
        A NetCDF file with at least a ``posterior`` group.

    Returns
    -------
    arviz.InferenceData or xarray.DataTree
        The same container type that :func:`to_arviz` returns with the installed ArviZ.

    Raises
    ------
    EGPSError
        If the file is missing, the NetCDF backend (h5netcdf, h5py) is not installed, or the file is not a
        readable NetCDF/HDF5 file or has no ``posterior`` group.
    """
    source = Path(path)
    if not source.is_file():
        raise EGPSError(f"no such run file: {source}")
    _require_backend("read", source)
    try:
        data = _read(source)
    except ImportError as err:
        raise _backend_error("read", source, err) from err
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise EGPSError(f"{source} is not a readable ArviZ NetCDF file ({type(err).__name__}: {err})") from err
    if "posterior" not in group_names(data):
        raise EGPSError(f"{source} has no 'posterior' group; it is not an egps_ppl run file")
    return data
