"""Data that Python callers hold in memory instead of in files.

Two uses. Predicting: ``model.predict("one text")``, a list of texts, image paths, PIL images or a uint8 array
become the inputs the backbones take. Fine-tuning and evaluating: a pandas DataFrame, a Hugging Face
``datasets.Dataset`` (anything with ``to_pandas()``) or a dict of equal-length columns is written to a Parquet
file and read by the same reader as a user's file, so the same checks apply (missing labels, unknown columns,
mixed label types) and a run directory's ``config.yaml`` names a file that replays and resumes the run. Images
held in a table (PIL images, ``{"bytes": ...}`` cells as ``datasets`` gives them, uint8 arrays) are written as
PNG files beside the table and the column becomes their relative paths.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import UserError
from .dataset import DecodedImages, ImageArray, ImagePaths, to_rgb_array
from .readers import IMAGE_SUFFIXES, is_missing, read_examples

# Run fields that name a data file, and so may be given a table object from Python instead.
DATA_FIELDS = ("train", "val", "test", "distill_data", "target", "target_test")


def is_table(value: Any) -> bool:
    """A DataFrame, a ``datasets.Dataset`` (or anything with ``to_pandas``) or a dict of columns."""
    import pandas as pd

    return isinstance(value, (pd.DataFrame, dict)) or callable(getattr(value, "to_pandas", None))


def _frame(value: Any, where: str):
    import pandas as pd

    if isinstance(value, pd.DataFrame):
        return value
    if isinstance(value, dict):
        if any(callable(getattr(column, "to_pandas", None)) for column in value.values()):  # a DatasetDict
            raise UserError(f"{where} holds several splits ({', '.join(map(str, value))}): pass one, e.g. "
                            f"dataset['{next(iter(value))}'], and the others as val/test")
        lengths = {name: len(column) for name, column in value.items() if hasattr(column, "__len__")}
        if len(lengths) != len(value) or len(set(lengths.values())) > 1:
            raise UserError(f"{where}: a dict of data must map each column name to a list, all of one length "
                            f"(got lengths {lengths}): pass equal-length lists")
        return pd.DataFrame(value)
    frame = value.to_pandas()
    if not isinstance(frame, pd.DataFrame):  # e.g. batched output
        raise UserError(f"{where}: {type(value).__name__}.to_pandas() did not give one table: pass one split "
                        "(e.g. dataset['train']) of a map-style dataset")
    # `datasets` stores class labels as integers with their names in the features (ClassLabel): keep the names,
    # so the run's classes, reports and predictions say 'cat', not 0.
    for name, feature in (getattr(value, "features", None) or {}).items():
        names = getattr(feature, "names", None)
        if name in frame.columns and isinstance(names, list) and names:
            frame[name] = [names[i] if isinstance(i, (int, np.integer)) and 0 <= i < len(names) else i
                           for i in frame[name]]
    return frame


def _is_image(cell: Any) -> bool:
    from PIL import Image

    return (isinstance(cell, Image.Image) or (isinstance(cell, dict) and cell.get("bytes") is not None)
            or (isinstance(cell, np.ndarray) and cell.ndim in (2, 3) and cell.dtype == np.uint8))


def _save_image(cell: Any, path: Path) -> None:
    from PIL import Image

    if isinstance(cell, dict):
        image = Image.open(io.BytesIO(cell["bytes"]))
    elif isinstance(cell, np.ndarray):
        image = Image.fromarray(cell)
    else:
        image = cell
    image.save(path, format="PNG", compress_level=1)  # lossless either way; ~2x faster than the default level


def write_table(value: Any, path: Path, where: str, *, image_column: str | None = None,
                text_column: str | None = None) -> str | None:
    """Write the table ``value`` to ``path`` (Parquet). Returns the column that holds images: image objects
    written as files (their paths relative to ``path``), or, with no ``image_column`` given, a column of image
    file names (made absolute); None when the table holds neither."""
    frame = _frame(value, where).copy()
    if len(frame) == 0:
        raise UserError(f"{where} is empty: it needs at least one example")
    frame.columns = [str(c) for c in frame.columns]
    image_columns = [c for c in frame.columns if frame[c].map(_is_image).any()]
    found_paths = None
    if image_column is None and text_column is None and not image_columns:
        # A column of image file names is an image column: the caller holding a DataFrame has no --image-column
        # habit, and reading the paths as texts would only fail later with a less useful message.
        found_paths = image_column = next((c for c in frame.columns if _all_image_paths(frame[c])), None)
    if image_column is not None and image_column in frame.columns and image_column not in image_columns:
        # Paths given in memory are relative to where the caller runs, not to the Parquet file written here.
        frame[image_column] = [str(Path(p).resolve()) if isinstance(p, (str, Path)) and str(p) else p
                               for p in frame[image_column]]
    if image_columns:
        column = image_column if image_column in image_columns else image_columns[0]
        folder = path.with_name(path.stem + "_images")
        folder.mkdir(parents=True, exist_ok=True)
        names = []
        cells = frame[column]
        if len(cells) >= 1000:  # tens of thousands of images take a minute or more to write
            from tqdm.auto import tqdm

            cells = tqdm(cells, desc=f"writing the images of {path.stem}", unit="image", mininterval=1.0,
                         dynamic_ncols=True)
        for row, cell in enumerate(cells):
            if not _is_image(cell):
                raise UserError(f"{where}: column '{column}' holds images, but row {row} holds "
                                f"{type(cell).__name__}: give every row an image")
            _save_image(cell, folder / f"{row:06d}.png")
            names.append(f"{folder.name}/{row:06d}.png")
        frame[column] = names
        frame = frame.drop(columns=[c for c in image_columns if c != column])
    for name in frame.columns:
        kinds = {type(v) for v in frame[name] if not is_missing(v)}
        if len(kinds) > 1 and not kinds <= {int, float}:
            # Mixed cells (1 and "x") as text, as a CSV would give them: the reader then names the mix.
            frame[name] = [None if is_missing(v) else str(v) for v in frame[name]]
    try:
        frame.to_parquet(path, index=False)
    except Exception as error:  # pyarrow's ArrowInvalid/ArrowTypeError for a column it cannot type
        detail = " ".join(str(a) for a in error.args).splitlines()[0]
        raise UserError(f"{where} could not be stored as a table ({detail}): give each column one type, e.g. "
                        "frame[column].astype(str)") from None
    return column if image_columns else found_paths


def _all_image_paths(column) -> bool:
    return all(isinstance(v, (str, Path)) and Path(v).suffix.lower() in IMAGE_SUFFIXES for v in column)


def _stage(value: Any, path: Path, where: str, columns: dict[str, Any]) -> dict[str, Any]:
    """Write one table to ``path``; ``columns`` with the image column set when the table's images were found
    and no input column was named."""
    images = write_table(value, path, where, image_column=columns.get("image_column"),
                         text_column=columns.get("text_column"))
    if images and columns.get("image_column") is None and columns.get("text_column") is None:
        return {**columns, "image_column": images}
    return columns


@contextlib.contextmanager
def _naming_the_objects(folder: str, objects: dict[Path, str]) -> Iterator[None]:
    """The reader names the temporary files; errors say which object the caller passed instead."""
    try:
        yield
    except UserError as error:
        message = str(error)
        for path, where in objects.items():
            message = message.replace(f"data file {path}", where).replace(str(path), where)
        raise UserError(message.replace(folder + "/", "")) from None


@contextlib.contextmanager
def staged_tables(fields: dict[str, Any], caller: str) -> Iterator[tuple[dict[str, Any], Path | None]]:
    """``fields`` with every table object among the data fields replaced by the path of a Parquet file in a
    temporary folder (yielded too, None when nothing was staged); the folder is deleted on exit, so a caller
    that keeps the data copies it out first (``keep_staged``)."""
    tables = {name: fields[name] for name in DATA_FIELDS if name in fields and is_table(fields[name])}
    if not tables:
        yield fields, None
        return
    fields = dict(fields)
    with tempfile.TemporaryDirectory(prefix="transferkit-data-") as folder:
        objects = {}
        for name, value in tables.items():
            path = Path(folder) / f"{name}.parquet"
            objects[path] = f"the {type(value).__name__} passed to {caller} as {name}"
            fields = {**_stage(value, path, objects[path], fields), name: str(path)}
        with _naming_the_objects(folder, objects):
            yield fields, Path(folder)


@contextlib.contextmanager
def staged_table(value: Any, caller: str, columns: dict[str, Any]) -> Iterator[tuple[Path, dict[str, Any]]]:
    """One table object as a temporary Parquet file, with the columns to read it by; errors name the object."""
    with tempfile.TemporaryDirectory(prefix="transferkit-data-") as folder:
        path = Path(folder) / "table.parquet"
        where = f"the {type(value).__name__} passed to {caller}"
        columns = _stage(value, path, where, columns)
        with _naming_the_objects(folder, {path: where}):
            yield path, columns


def accepts_tables(caller: str):
    """Decorate an entry point taking data fields as keyword arguments, so they may be tables held in memory
    (staged for the call's duration)."""
    import functools

    def decorate(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            with staged_tables(kwargs, caller) as (staged_kwargs, _):
                return function(*args, **staged_kwargs)
        return wrapper
    return decorate


def keep_staged(config, staged: Path | None, run_dir: Path):
    """Copy staged tables into ``run_dir/data`` and point ``config`` at them, so the run can be replayed and
    resumed from its directory alone."""
    if staged is None:
        return config
    target = run_dir / "data"
    target.mkdir(parents=True, exist_ok=True)
    changes = {}
    for item in sorted(staged.iterdir()):
        destination = target / item.name
        if destination.exists():  # a resumed run given its data again: the new copy replaces the old
            shutil.rmtree(destination) if destination.is_dir() else destination.unlink()
        # Copied, not moved: images are decoded lazily from the staged files while the run trains.
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, destination)
    for name in DATA_FIELDS:
        value = getattr(config, name, None)
        if value and Path(value).parent == staged:
            changes[name] = str(target / Path(value).name)
    return config.replace(**changes)


def model_inputs(inputs: Any, modality: str, where: str = "predict()"):
    """What ``FineTunedModel.predict`` and friends accept, as the inputs a backbone prepares.

    Texts: one string, or a sequence of strings (list, tuple, pandas Series, numpy array). Images: one path or
    PIL image, a folder, a list of paths, of PIL images or of (H, W[, C]) uint8 arrays, a uint8 array
    (N, H, W[, C]), or the ImageArray/ImagePaths the readers give.
    """
    if modality == "text":
        if isinstance(inputs, str):
            return [inputs]
        if isinstance(inputs, (ImageArray, ImagePaths, DecodedImages)) or not hasattr(inputs, "__iter__"):
            raise UserError(f"{where}: this model takes texts: pass a string or a list of strings")
        texts = list(inputs)
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise UserError(f"{where}: input {bad} is a {type(texts[bad]).__name__}, not a text: pass strings")
        return texts
    return _image_inputs(inputs, where)


def _image_inputs(inputs: Any, where: str):
    from PIL import Image

    if isinstance(inputs, (ImageArray, ImagePaths, DecodedImages)):
        return inputs
    if isinstance(inputs, (str, Path)) and Path(inputs).is_dir():  # a folder: its images (class folders or flat)
        return read_examples(inputs, require_labels=False).inputs
    if isinstance(inputs, (str, Path, Image.Image)):
        inputs = [inputs]
    if isinstance(inputs, np.ndarray):
        if inputs.dtype != np.uint8:
            raise UserError(f"{where}: the image array is {inputs.dtype}, not uint8: pass pixel values 0-255, "
                            "e.g. (array * 255).astype('uint8')")
        if inputs.ndim not in (3, 4):
            raise UserError(f"{where}: the image array has shape {inputs.shape}: pass (N, H, W) or (N, H, W, C), "
                            "or a list of one image")
        return ImageArray(inputs)
    if not hasattr(inputs, "__iter__"):
        raise UserError(f"{where}: this model takes images: pass paths, PIL images or a uint8 array")
    items = list(inputs)
    if items and all(isinstance(i, (str, Path)) for i in items):
        paths = [Path(i) for i in items]
        missing = next((p for p in paths if not p.is_file()), None)
        if missing is not None:
            raise UserError(f"{where}: image {missing} does not exist: fix the path")
        return ImagePaths(paths)
    arrays = []
    for index, item in enumerate(items):
        if isinstance(item, Image.Image):
            arrays.append(to_rgb_array(item))
        elif isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim in (2, 3):
            arrays.append(item)
        else:
            raise UserError(f"{where}: input {index} is a {type(item).__name__}: pass image paths, PIL images or "
                            "uint8 arrays (H, W[, C]), not a mix")
    return DecodedImages(arrays)
