"""Readers: turn a user's file or folder into ``Examples``, refusing bad input with one clear line.

Supported: CSV/TSV/JSONL/Parquet tables (a text column, or an image-path column, and a label
column), image folders (one sub-folder per class), IDX files (the MNIST format, gzipped or not).
No row is ever dropped silently: a missing label or text is an error that names the row.
"""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np

from ..errors import UserError
from .dataset import Examples, ImageArray, ImagePaths

TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t", ".txt": "\t", ".jsonl": None, ".json": None, ".parquet": None}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Folder names of a dataset already split (root/train/<class>/...), mapped to the option that takes each.
SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val",
                 "test": "test", "testing": "test"}
# Names a label column often has; one of them in a table without 'label' is named in the error's fix (never
# used unasked: a column called 'class' may hold something else).
LABEL_COLUMN_GUESSES = {"labels", "target", "targets", "class", "classes", "category", "categories", "sentiment",
                        "polarity", "y", "tag", "intent", "topic", "rating", "stars"}
TEXT_COLUMN_GUESSES = ("text", "sentence", "review", "content", "document")
# How spreadsheets and pandas spell a missing value; as a label these mean "no label", never a class.
MISSING_LABELS = {"nan", "none", "null", "na", "n/a", "#n/a"}


def read_examples(
    path: str | Path,
    *,
    label_column: str | None = "label",
    text_column: str | None = None,
    image_column: str | None = None,
    require_labels: bool = True,
) -> Examples:
    """Read one split from ``path``. With ``require_labels=False`` a missing label column is allowed."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"data file {path} does not exist: check the path")
    if path.is_dir():
        if text_column or image_column:
            raise UserError(f"{path} is a folder (an image folder), so 'text_column'/'image_column' do not apply: drop them")
        if not require_labels and not any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir()):
            return read_unlabelled_images(path)
        return read_image_folder(path)
    name = path.name.lower()
    if path.suffix.lower() in IMAGE_SUFFIXES and not require_labels:  # `predict --input photo.jpg`: one image
        _check_images([path], f"image {path}")
        return Examples(ImagePaths([path]), None, str(path), "image")
    if "idx" in name or name.endswith("-ubyte") or name.endswith("-ubyte.gz"):
        return read_idx(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise UserError(
            f"data file {path} has an unsupported type '{suffix}': use .csv, .tsv, .jsonl, .parquet, an IDX file or an image folder"
            + (" (one image file is taken by predict, not as labelled data)" if suffix in IMAGE_SUFFIXES else "")
        )
    return read_table(path, label_column=label_column, text_column=text_column, image_column=image_column,
                      require_labels=require_labels)


def _load_frame(path: Path):
    import pandas as pd

    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise UserError(f"data file {path} is empty: it needs a header row and at least one example")
    try:
        if suffix == ".parquet":
            frame = pd.read_parquet(path)
        elif suffix in (".jsonl", ".json"):
            frame = pd.read_json(path, lines=suffix == ".jsonl", dtype=False, encoding="utf-8")
        else:
            # Everything as text so that labels keep their spelling and no value becomes NaN by guesswork.
            frame = pd.read_csv(path, sep=TABLE_SUFFIXES[suffix], dtype=str, keep_default_na=False,
                                encoding="utf-8-sig", quoting=0)
    except UnicodeDecodeError as error:
        raise UserError(
            f"data file {path} is not UTF-8 text (bad byte at position {error.start}): re-save it as UTF-8"
        ) from None
    except pd.errors.EmptyDataError:
        raise UserError(f"data file {path} is empty: it needs a header row and at least one example") from None
    except pd.errors.ParserError as error:
        detail = str(error).strip().splitlines()[-1]
        raise UserError(f"data file {path} could not be parsed ({detail}): check quoting and the number of fields per row") from None
    except ValueError as error:
        raise UserError(f"data file {path} could not be read ({str(error).splitlines()[0]}): check its format") from None
    except Exception as error:  # pyarrow and others raise their own types for corrupt files
        raise UserError(f"data file {path} could not be read ({type(error).__name__}): check that it is a valid {suffix} file") from None
    if not isinstance(frame, pd.DataFrame):
        raise UserError(f"data file {path} does not hold a table of records: one JSON object per line is expected")
    frame.columns = [str(c).strip() for c in frame.columns]
    if suffix in (".csv", ".tsv", ".txt"):
        duplicated = _duplicated_header(path, TABLE_SUFFIXES[suffix])
        if duplicated:
            raise UserError(f"data file {path} has duplicated column names {duplicated}: give every column a unique name")
    return frame


def table_columns(path: str | Path) -> list[str]:
    """The column names of a table file, from its header or schema (nothing else is read); [] for anything that is
    not a readable table (the full read then reports what is wrong)."""
    import csv
    import json

    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return [str(name).strip() for name in pq.read_schema(path).names]
        if suffix == ".jsonl":
            with open(path, encoding="utf-8") as handle:
                first = next((line for line in handle if line.strip()), "{}")
            record = json.loads(first)
            return [str(k).strip() for k in record] if isinstance(record, dict) else []
        if suffix in TABLE_SUFFIXES and suffix != ".json":
            with open(path, encoding="utf-8-sig", newline="") as handle:
                return [c.strip() for c in next(csv.reader(handle, delimiter=TABLE_SUFFIXES[suffix]), [])]
    except (OSError, ValueError, UnicodeDecodeError, ImportError):
        return []
    return []


def _duplicated_header(path: Path, delimiter: str) -> list[str]:
    """pandas renames a repeated column to 'name.1'; read the raw header to catch it."""
    import csv

    with open(path, encoding="utf-8-sig", newline="") as handle:
        header = next(csv.reader(handle, delimiter=delimiter), [])
    names = [h.strip() for h in header]
    return sorted({n for n in names if names.count(n) > 1})


def is_missing(value) -> bool:
    """None, NaN, and pandas' NA and NaT (what nullable columns, e.g. a Parquet file's Int64 or string labels,
    hold for a missing cell)."""
    import pandas as pd

    return (value is None or value is pd.NA or value is pd.NaT
            or (isinstance(value, (float, np.floating)) and math.isnan(value)))


def _cell_to_text(value) -> str | None:
    """A cell as a string, or None when it is missing."""
    if is_missing(value):
        return None
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if value.is_integer():
            return str(int(value))
    if isinstance(value, (bool, np.bool_)):
        return str(value).lower()
    text = str(value).strip()
    return text if text else None


def _canonical_number(label: str) -> str:
    """'1.0' and '1' name the same class: integral numbers are written without a fraction."""
    try:
        number = float(label)
    except ValueError:
        return label
    return str(int(number)) if number.is_integer() else label


def _check_label_types(path: Path, column: str, labels: list[str]) -> None:
    """Numbers mixed with words in one label column are almost always a data-preparation slip."""
    def is_number(label: str) -> bool:
        try:
            float(label)
            return True
        except ValueError:
            return False

    numeric = [i for i, label in enumerate(labels) if is_number(label)]
    if numeric and len(numeric) < len(labels):
        word = next(i for i, label in enumerate(labels) if not is_number(label))
        raise UserError(
            f"data file {path}: column '{column}' mixes numbers ({labels[numeric[0]]!r} at {_row_name(path, numeric[0])}) "
            f"and words ({labels[word]!r} at {_row_name(path, word)}): use one kind of label"
        )


def _check_not_continuous(path: Path, column: str, labels: list[str]) -> None:
    """Many distinct fractional numbers are a regression target, which a classifier would turn into one class per
    value (and then fail on the split, or predict only values it saw)."""
    distinct = set(labels)
    if len(distinct) <= 20:
        return
    try:
        numbers = [float(label) for label in distinct]
    except ValueError:
        return
    fractional = next((label for label, number in zip(distinct, numbers) if not number.is_integer()), None)
    if fractional is not None:
        raise UserError(
            f"data file {path}: column '{column}' holds {len(distinct)} distinct numbers such as {fractional!r}, a "
            f"continuous target; transferkit fine-tunes classifiers: bin the values into classes (e.g. pandas.cut) "
            f"or name the column of class labels with --label-column")


def _row_name(path: Path, index: int) -> str:
    # CSV/TSV have a header line, so data row i sits on line i + 2; JSONL line i + 1.
    if path.suffix.lower() in (".csv", ".tsv", ".txt"):
        return f"line {index + 2}"
    if path.suffix.lower() in (".jsonl", ".json"):
        return f"line {index + 1}"
    return f"row {index}"


def _missing_error(path: Path, column: str, rows: list[int], what: str) -> UserError:
    shown = ", ".join(_row_name(path, i) for i in rows[:5])
    more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    return UserError(f"data file {path}: column '{column}' has {what} at {shown}{more}: fill them in or remove those rows")


def _clip(name: object, width: int = 30) -> str:
    name = str(name)
    return name if len(name) <= width else name[:width - 3] + "..."


def _looks_headerless(path: Path, columns: list) -> bool:
    """A CSV/TSV whose 'column names' look like data: a number (a label such as 0 or 1) or a sentence."""
    if TABLE_SUFFIXES.get(path.suffix.lower()) is None:  # JSONL and Parquet name their fields in every row
        return False

    def is_number(name: str) -> bool:
        try:
            float(name)
        except ValueError:
            return False
        return True

    names = [str(c).strip() for c in columns]
    return (any(is_number(n) for n in names) or any(len(n) > 40 and n.count(" ") >= 4 for n in names)
            or any(Path(n).suffix.lower() in IMAGE_SUFFIXES for n in names))


def read_table(path: Path, *, label_column: str | None, text_column: str | None, image_column: str | None,
               require_labels: bool = True) -> Examples:
    frame = _load_frame(path)
    columns = list(frame.columns)
    if len(frame) == 0:
        raise UserError(f"data file {path} has a header but no rows: add examples")

    has_labels = label_column is not None and label_column in columns
    if require_labels and not has_labels:
        if _looks_headerless(path, columns):
            raise UserError(
                f"data file {path} has no label column '{label_column}' and its first line looks like an example, not "
                f"a header (columns read: {[_clip(c) for c in columns]}): add a header line naming the columns, e.g. "
                + ("'text,label'" if TABLE_SUFFIXES[path.suffix.lower()] == "," else "'text<TAB>label'"))
        likely = [c for c in columns if str(c).strip().lower() in LABEL_COLUMN_GUESSES]
        fix = f"pass --label-column {likely[0]}" if len(likely) == 1 else "pass --label-column NAME"
        raise UserError(f"data file {path} has no label column '{label_column}'; available columns: {columns}: {fix}")

    if image_column is not None:
        input_column = image_column
    elif text_column is not None:
        input_column = text_column
    else:
        others = [c for c in columns if c != label_column]
        guesses = [c for c in TEXT_COLUMN_GUESSES if c in others]
        if guesses:
            input_column = guesses[0]
        elif len(others) == 1:
            input_column = others[0]
        else:
            raise UserError(
                f"data file {path}: cannot tell which column holds the inputs; available columns: {columns}: pass --text-column NAME or --image-column NAME"
            )
    if input_column not in columns:
        flag = "--image-column" if image_column is not None else "--text-column"
        raise UserError(f"data file {path} has no column '{input_column}'; available columns: {columns}: fix {flag}")
    if image_column is None and text_column is None and _looks_headerless(path, [input_column]):
        # Without a header the first example would silently become the column's name (and be left out).
        raise UserError(
            f"data file {path}: its first line looks like an example, not a header (column name read: "
            f"'{_clip(input_column)}'): add a header line naming the columns, e.g. 'text', so no example is lost")

    _check_scalar_cells(path, frame, input_column, "a text or an image path per row (join the parts into one string)")
    if has_labels:
        _check_scalar_cells(path, frame, label_column, "one label per row: transferkit trains single-label "
                                                       "classifiers, not multi-label ones")
    inputs = [_cell_to_text(v) for v in frame[input_column].tolist()]
    missing = [i for i, v in enumerate(inputs) if v is None]
    if missing:
        raise _missing_error(path, input_column, missing, "empty values")

    labels = None
    if has_labels:
        labels = [_cell_to_text(v) for v in frame[label_column].tolist()]
        labels = [None if v is None or v.lower() in MISSING_LABELS else _canonical_number(v) for v in labels]
        missing = [i for i, v in enumerate(labels) if v is None]
        if missing:
            raise _missing_error(path, label_column, missing, "missing labels")
        _check_label_types(path, label_column, labels)
        _check_not_continuous(path, label_column, labels)

    if image_column is not None:
        base = path.parent
        paths = [Path(p) if Path(p).is_absolute() else base / p for p in inputs]
        _check_images(paths, f"data file {path}, column '{image_column}'")
        return Examples(ImagePaths(paths), labels, str(path), "image")
    return Examples(inputs, labels, str(path), "text")


def _check_scalar_cells(path: Path, frame, column: str, fix: str) -> None:
    """JSONL and Parquet cells may hold lists or records; written out as text they would train on their repr
    ("['pos', 'funny']" as a class of its own)."""
    for index, value in enumerate(frame[column].tolist()):
        if isinstance(value, (list, tuple, dict, set, np.ndarray)):
            raise UserError(f"data file {path}: column '{column}' holds a {type(value).__name__} at {_row_name(path, index)} "
                            f"({_clip(value, 40)}): give {fix}")


def _check_images(paths: list[Path], where: str) -> None:
    """Open every image header now, so a bad file fails before training rather than hours into it."""
    from PIL import Image, UnidentifiedImageError

    for p in paths:
        if not p.is_file():
            raise UserError(f"{where}: image {p} does not exist: fix the path (relative paths are relative to the table)")
        try:
            with Image.open(p) as image:
                image.verify()
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
            raise UserError(f"{where}: image {p} is not a readable image: replace or remove it") from None


def read_image_folder(root: Path) -> Examples:
    """An image folder: ``root/<class name>/<image file>``."""
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise UserError(f"image folder {root} has no class sub-folders: put each class's images in root/<class>/")
    stray = [p.name for p in root.iterdir() if p.is_file() and not p.name.startswith(".")]
    if stray:
        raise UserError(f"image folder {root} has files outside class sub-folders ({stray[:3]}): move them into a class folder")
    names = {d.name.lower() for d in class_dirs}
    if names <= set(SPLIT_FOLDERS) and all(any(c.is_dir() for c in d.iterdir()) for d in class_dirs):
        # root/train/<class>/..., root/test/<class>/...: read as it stands, the splits would become the classes.
        flags = " ".join(f"--{SPLIT_FOLDERS[d.name.lower()]} {d}" for d in class_dirs)
        raise UserError(f"image folder {root} holds splits ({', '.join(d.name for d in class_dirs)}), each with class "
                        f"folders, not classes: pass them one by one, {flags}")
    paths, labels = [], []
    for class_dir in class_dirs:
        for p in sorted(class_dir.rglob("*")):
            if p.is_symlink() and p.is_dir():
                raise UserError(
                    f"image folder {root}: {p} is a link to a folder (links inside class folders are not followed, "
                    f"and can loop): replace it with the image files"
                )
            if p.is_dir() or p.name.startswith("."):
                continue
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                raise UserError(
                    f"image folder {root}: {p} is not an image file (expected {', '.join(sorted(IMAGE_SUFFIXES))}): move it out"
                )
            paths.append(p)
            labels.append(class_dir.name)
    if not paths:
        raise UserError(f"image folder {root} holds no images: add images under root/<class>/")
    _check_images(paths, f"image folder {root}")
    return Examples(ImagePaths(paths), labels, str(root), "image")


def read_unlabelled_images(root: Path) -> Examples:
    """A flat folder of images to predict on (no class sub-folders, so no labels)."""
    paths = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    strays = [p.name for p in paths if p.suffix.lower() not in IMAGE_SUFFIXES]
    if strays:
        raise UserError(f"image folder {root}: {strays[:3]} are not image files: move them out")
    if not paths:
        raise UserError(f"image folder {root} holds no images")
    _check_images(paths, f"image folder {root}")
    return Examples(ImagePaths(paths), None, str(root), "image")


def _open_maybe_gzip(path: Path) -> bytes:
    with open(path, "rb") as handle:
        head = handle.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    try:
        with opener(path, "rb") as handle:
            return handle.read()
    except (OSError, EOFError) as error:
        raise UserError(f"IDX file {path} is corrupt ({error}): download it again") from None


def parse_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (the MNIST format): big-endian header, then uint8 data."""
    raw = _open_maybe_gzip(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise UserError(f"IDX file {path} has no IDX header: it is not an MNIST-format file")
    if raw[2] != 0x08:
        raise UserError(f"IDX file {path} holds type 0x{raw[2]:02x}; only unsigned bytes (0x08) are supported")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise UserError(f"IDX file {path} is truncated inside its header: download it again")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    expected = int(np.prod(shape)) if ndim else 0
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != expected:
        raise UserError(f"IDX file {path} should hold {expected} values for shape {shape} but holds {data.size}: it is truncated or corrupt")
    return data.reshape(shape)


def idx_labels_path(images_path: Path) -> Path:
    name = images_path.name
    for old, new in (("images-idx3", "labels-idx1"), ("images", "labels")):
        if old in name:
            return images_path.with_name(name.replace(old, new))
    raise UserError(
        f"IDX file {images_path}: cannot find its labels file; name the pair '*-images-idx3-ubyte[.gz]' and '*-labels-idx1-ubyte[.gz]'"
    )


def read_idx(images_path: Path, class_names: list[str] | None = None) -> Examples:
    """An IDX images file with its labels file beside it (``*images*`` -> ``*labels*``)."""
    if "labels" in images_path.name:
        raise UserError(f"{images_path} is an IDX labels file: pass the images file; its labels are found beside it")
    images = parse_idx(images_path)
    if images.ndim not in (3, 4):
        raise UserError(f"IDX file {images_path} has shape {images.shape}; images need (N, H, W) or (N, H, W, C)")
    labels_path = idx_labels_path(images_path)
    if not labels_path.exists():
        raise UserError(f"IDX file {images_path}: its labels file {labels_path} does not exist: put it beside the images")
    label_ids = parse_idx(labels_path)
    if label_ids.ndim != 1 or len(label_ids) != len(images):
        raise UserError(f"IDX labels {labels_path} hold {label_ids.shape} values for {len(images)} images: the pair does not match")
    if class_names is not None:
        labels = [class_names[int(i)] for i in label_ids]
    else:
        labels = [str(int(i)) for i in label_ids]
    return Examples(ImageArray(images), labels, str(images_path), "image")
