"""The trials a Tune experiment saved, checked against the sweep file before `--resume` restores it.

`Tuner.restore` brings back whatever trials the experiment state lists, whatever the sweep file
says now. Two ways that goes wrong were seen or are easy to make: the sweep file was edited between
the runs (a value added or changed), or the driver died before Tune had written the trials down
(once in CI, `restore` brought back a single trial with no parameters, which then trained the base
config as if it were a grid point). Either way `--resume` would run something other than the grid.
So the newest `experiment_state-*.json` is read first and every trial in it must be one the sweep
file can produce; after the fit, `missing_grid_points` says which grid points never ran.

No Ray here: the state is plain JSON (each `trial_data` entry is a pair of JSON strings, the trial
and its run metadata; Ray 2.60), read through `eir.storage` so an `s3://` sweep dir works too.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from typing import Any

from eir import storage
from eir.config import ConfigError

STATE_PREFIX = "experiment_state-"
REMEDY = "run it under a new sweep name (name=...) or remove the sweep dir to start it over"


def saved_trial_params(folder: storage.Location) -> tuple[str, list[dict[str, Any]]] | None:
    """(file uri, each saved trial's params) from the newest experiment state; None if there is none.

    Tune names the files by their start time (`experiment_state-2026-12-06_23-31-00.json`), so the
    newest sorts last.
    """
    names = [n for n in storage.list_dir(folder) if n.startswith(STATE_PREFIX) and n.endswith(".json")]
    if not names:
        return None
    loc = folder.join(max(names))
    try:
        entries = json.loads(storage.read_bytes(loc).decode("utf-8"))["trial_data"]
        params = [json.loads(entry[0]).get("config") or {} for entry in entries]
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise ConfigError(
            f"{loc.uri} is not a Tune experiment state this version reads ({type(exc).__name__}: {exc}); {REMEDY}"
        ) from exc
    return loc.uri, [dict(p) for p in params]


def check_saved_trials(
    saved: list[dict[str, Any]], space: dict[str, dict[str, list]], num_samples: int, where: str, sweep_file: str
) -> None:
    """ConfigError unless every saved trial is one the sweep file's space can produce.

    Each trial must set exactly the swept keys, each to one of its grid/choice values or inside its
    range; for an all-grid space the saved trials must also fit in the grid × num_samples (no grid
    point more often than it is repeated). Fewer saved trials than grid points is allowed: Tune's
    searcher state generates the rest on restore, and `missing_grid_points` checks the outcome.
    """
    keys = set(space)
    foreign = [
        params for params in saved if set(params) != keys or not all(_allowed(space[k], params[k]) for k in keys)
    ]
    if not foreign and _all_grid(space):
        excess = Counter(map(_canonical, saved)) - _grid_counts(space, num_samples)
        foreign = [json.loads(text) for text in excess.elements()]
    if foreign:
        shown = "; ".join(json.dumps(params, sort_keys=True) for params in foreign[:3])
        more = f" (and {len(foreign) - 3} more)" if len(foreign) > 3 else ""
        raise ConfigError(
            f"--resume: {where} lists {len(foreign)} trial(s) that {sweep_file} does not produce: {shown}{more}; "
            f"the sweep file swept {sorted(keys)} with {json.dumps(space, sort_keys=True)}. "
            f"The file changed since the sweep started, or the sweep stopped before Tune saved its trials: {REMEDY}"
        )


def missing_grid_points(
    finished: list[dict[str, Any]], space: dict[str, dict[str, list]], num_samples: int
) -> list[dict[str, Any]]:
    """The grid points (repeats counted) no trial ran; [] for a space that samples."""
    if not _all_grid(space):
        return []
    missing = _grid_counts(space, num_samples) - Counter(map(_canonical, finished))
    return [json.loads(text) for text in sorted(missing.elements())]


def _all_grid(space: dict[str, dict[str, list]]) -> bool:
    return all("grid" in dist for dist in space.values())


def _grid_counts(space: dict[str, dict[str, list]], num_samples: int) -> Counter[str]:
    """Each grid point (canonical JSON) with the number of trials Tune makes of it."""
    keys = list(space)
    points = (dict(zip(keys, values, strict=True)) for values in itertools.product(*(space[k]["grid"] for k in keys)))
    return Counter(_canonical(point) for point in points for _ in range(num_samples))


def _allowed(dist: dict[str, list], value: Any) -> bool:
    kind, values = next(iter(dist.items()))
    if kind in ("grid", "choice"):
        return _canonical(value) in {_canonical(v) for v in values}  # as the JSON round trip leaves them
    lo, hi = values
    return isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value <= hi


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)
