"""Tables from wherever users keep them, read with `datasets`: a JSON Lines / JSON / Parquet / CSV file, a
folder written by `save_to_disk`, or a Hugging Face hub dataset id. Shared by the preference data
(reward_model.data), prompt files (rlhf.prompts) and the export (labeling.export). Every failure is one
UserError line."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

from rlhf.errors import UserError
from rlhf.jsonl import read_jsonl
from rlhf.models import is_local_path

FILE_BUILDERS = {".jsonl": "json", ".jsonl.gz": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# The folder `rlhf export` writes names its format in export.json; readers refuse another one.
EXPORT_FORMAT = "rlhf-export/1"
EXPORT_META = "export.json"


@contextmanager
def quiet_datasets():
    """No `datasets` progress bars nor log lines inside the block (small tables; a builder logs the error it then
    raises, so without this a broken file printed the library's text before ours)."""
    import datasets

    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    library_log = logging.getLogger("datasets")
    level = library_log.level
    library_log.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        library_log.setLevel(level)
        if enabled:
            datasets.enable_progress_bars()


class NotOnHub(UserError):
    """A name that is no local file or folder, and that the Hugging Face hub cannot give as a dataset (not reachable,
    offline without a cached copy, or no such dataset)."""


def cause(exc: BaseException) -> str:
    """The first line of what went wrong inside a `datasets` call (its own wrapper says little)."""
    inner = (exc.__cause__ or exc.__context__) if type(exc).__name__ == "DatasetGenerationError" else exc
    text = str(inner or exc).strip()
    return text.splitlines()[0] if text else type(inner or exc).__name__


def is_jsonl(path: Path) -> bool:
    """Whether the file is JSON Lines (.jsonl, or .jsonl.gz: gzip-compressed), whose errors can name a line."""
    return path.name.lower().endswith((".jsonl", ".jsonl.gz"))


def read_table_file(path: Path):
    """A JSON Lines (.jsonl or .jsonl.gz) / JSON / Parquet / CSV file as a `Dataset` (None when it holds nothing)."""
    from datasets import load_dataset

    builder = FILE_BUILDERS[".jsonl"] if is_jsonl(path) else FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise UserError(f"{path}: unsupported file type (expected .jsonl, .jsonl.gz, .json, .parquet or .csv)")
    if not _has_content(path):
        return None
    try:
        with quiet_datasets():
            return load_dataset(builder, data_files={"train": str(path)}, split="train")
    except Exception as exc:  # noqa: BLE001 -- the builders raise arrow, pandas and datasets errors alike
        if is_jsonl(path):
            for _ in read_jsonl(path):  # names the malformed line, when one is
                pass
        raise UserError(f"{path}: cannot be read as a table ({cause(exc)})") from None


def _has_content(path: Path) -> bool:
    import gzip

    with gzip.open(path, "rb") if path.suffix.lower() == ".gz" else path.open("rb") as handle:
        while chunk := handle.read(1 << 16):
            if chunk.strip():
                return True
    return False


def load_saved(path: Path) -> dict[str, object]:
    """{split: Dataset} of a folder written by `Dataset.save_to_disk` ("train") or `DatasetDict.save_to_disk`."""
    from datasets import DatasetDict, load_from_disk

    try:
        with quiet_datasets():
            saved = load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{path}: cannot load the saved dataset ({cause(exc)})") from None
    return dict(saved) if isinstance(saved, DatasetDict) else {"train": saved}


def is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def load_hub(name: str) -> dict[str, object]:
    """{split: Dataset} of a hub dataset id; fails fast when the hub cannot be reached."""
    import datasets
    from datasets import DatasetDict, load_dataset

    from rlhf.models import hub_reachable

    if not datasets.config.HF_HUB_OFFLINE and not hub_reachable():
        raise NotOnHub(f"{name!r} is not a local file or folder, and the Hugging Face hub is not reachable "
                       f"to load it as a dataset id (with HF_HUB_OFFLINE=1 a cached copy is used)")
    try:
        with quiet_datasets():
            loaded = load_dataset(name)
    except Exception as exc:  # noqa: BLE001 -- the hub client's errors have many types
        if datasets.config.HF_HUB_OFFLINE:  # set by the user, or by a model load that found no hub
            raise NotOnHub(f"{name!r} is not a local file or folder, and the Hugging Face hub is not reachable to "
                           f"load it as a dataset id (offline mode, no cached copy: {cause(exc)})") from None
        if type(exc).__name__ == "DatasetNotFoundError":
            raise NotOnHub(f"{name!r} is not a local file or folder, nor a dataset on the Hugging Face hub "
                           f"({cause(exc)})") from None
        raise UserError(f"cannot load dataset {name!r} from the Hugging Face hub ({cause(exc)})") from None
    return dict(loaded) if isinstance(loaded, DatasetDict) else {"train": loaded}


def looks_like_path(data: str) -> bool:
    """A string that can only mean a local path: one by its shape (`rlhf.models.is_local_path`), or a file name."""
    return is_local_path(data) or Path(data).suffix.lower() in FILE_BUILDERS
