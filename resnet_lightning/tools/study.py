"""A sweep's Optuna study: where it is stored, and opening it (the dashboard, the report).

A storage is a database URL (`sqlite:///outputs/optuna.db`, `postgresql://...`) or a journal
file (Optuna's JournalFileBackend, which is safe on a shared file system). An Optuna sweep
names its storage and study in its directory's `optimization_results.yaml` (keys `storage`
and `study_name`); without a storage of its own it keeps the study in the sweep directory's
`optuna_journal.log`.

Optuna is the `sweep` extra, not a dependency: it is imported only to open a storage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from resnet_lightning.errors import UsageError

if TYPE_CHECKING:
    import optuna

RESULTS_FILE = "optimization_results.yaml"
JOURNAL_FILE = "optuna_journal.log"
SQLITE_HEADER = b"SQLite format 3\x00"
WHAT_TO_PASS = (
    "pass a sweep directory (outputs/multirun/<date>_optuna), a journal file "
    "(<sweep>/optuna_journal.log) or a database URL (sqlite:///outputs/optuna.db)"
)


@dataclass(frozen=True)
class StudyLocation:
    storage: str  # a database URL or a journal file's path
    study_name: str | None  # None: the storage's only study


def sweep_study(directory: Path) -> StudyLocation | None:
    """The study of the sweep in `directory`, or None when it has none (a plain multirun)."""
    results = directory / RESULTS_FILE
    saved = (yaml.safe_load(results.read_text()) or {}) if results.is_file() else {}
    name = saved.get("study_name")
    if saved.get("storage"):
        return StudyLocation(str(saved["storage"]), name)
    if (directory / JOURNAL_FILE).is_file():
        return StudyLocation(str(directory / JOURNAL_FILE), name)
    return None


def locate_study(location: str) -> StudyLocation:
    """A sweep directory, a storage URL or a journal file, as the storage and study it names."""
    if "://" in location:
        return StudyLocation(location, None)
    path = Path(location)
    if path.is_dir():
        found = sweep_study(path)
        if found is None:
            raise UsageError(
                f"{path} holds no Optuna study (neither a storage in {RESULTS_FILE} nor "
                f"{JOURNAL_FILE}); pass the directory of an hparams_search=optuna sweep, a "
                "journal file or a database URL"
            )
        return found
    if path.is_file():
        return StudyLocation(str(path), None)
    raise UsageError(f"{location} does not exist; {WHAT_TO_PASS}")


def open_storage(storage: str) -> optuna.storages.BaseStorage:
    """The Optuna storage at `storage` (a URL or a journal file), which must exist already:
    opening would otherwise create an empty one."""
    from resnet_lightning.callbacks.optuna_pruning import journal_file
    from resnet_lightning.callbacks.optuna_pruning import open_storage as open_or_create

    path = journal_file(storage)
    if path is not None:
        if not path.is_file():
            raise UsageError(f"no study journal at {path}; {WHAT_TO_PASS}")
        with path.open("rb") as file:
            if file.read(len(SQLITE_HEADER)) == SQLITE_HEADER:
                raise UsageError(f"{path} is an SQLite database; pass it as sqlite:///{path}")
        try:  # reads the whole journal
            return open_or_create(storage)
        except ValueError as err:
            raise UsageError(f"{path} is not an Optuna journal ({err}); {WHAT_TO_PASS}") from err
    if storage.startswith("sqlite:///") and not Path(storage[len("sqlite:///") :]).is_file():
        raise UsageError(f"{storage}: no such database file; {WHAT_TO_PASS}")
    try:
        return open_or_create(storage)
    except Exception as err:  # SQLAlchemy's, the driver's: none is a bug of ours
        raise UsageError(f"cannot open the study storage {storage}: {err}") from err


def load_study(location: StudyLocation) -> optuna.Study:
    import optuna

    storage = open_storage(location.storage)
    names = [study.study_name for study in storage.get_all_studies()]
    if location.study_name is None and len(names) == 1:
        return optuna.load_study(study_name=names[0], storage=storage)
    if location.study_name in names:
        return optuna.load_study(study_name=location.study_name, storage=storage)
    wanted = f"no study {location.study_name!r}" if location.study_name else "several studies"
    studies = ", ".join(names) or "none"
    raise UsageError(f"{location.storage} holds {wanted}; its studies: {studies}")
