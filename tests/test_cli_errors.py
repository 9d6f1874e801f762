"""Every user mistake: exit code 2, one line naming the file/field and the fix, no traceback, and no
run directory that looks finished."""

import subprocess
import sys

import pytest

from transferkit.cli import main
from transferkit.errors import UserError

from .conftest import make_sentences, write_table


@pytest.fixture()
def files(tmp_path, image_folder):
    rows = make_sentences(60)
    paths = {
        "train": write_table(tmp_path / "train.csv", rows),
        "unseen": write_table(tmp_path / "unseen.csv", [("good film", "neutral"), ("bad film", "pos")]),
        "single": write_table(tmp_path / "single.csv", [(f"film {i}", "pos") for i in range(30)]),
        "empty": tmp_path / "empty.csv",
        "latin1": tmp_path / "latin1.csv",
        "images": image_folder,
    }
    paths["empty"].write_text("text,label\n")
    paths["latin1"].write_bytes("text,label\ncafé crème,pos\nthé,neg\n".encode("latin-1"))
    (image_folder / "vertical" / "broken.png").write_bytes(b"not an image")
    return paths


CASES = {
    "missing file": (["--train", "{tmp}/nope.csv", "--model", "minilm-l6"], "does not exist"),
    "unknown column": (["--train", "{train}", "--text-column", "body", "--model", "minilm-l6"], "available columns: ['text', 'label']"),
    "unknown label column": (["--train", "{train}", "--label-column", "y", "--model", "minilm-l6"], "--label-column"),
    "empty dataset": (["--train", "{empty}", "--model", "minilm-l6"], "no rows"),
    "unseen test label": (["--train", "{train}", "--test", "{unseen}", "--model", "minilm-l6"], "never occur in the training data"),
    "single class": (["--train", "{single}", "--model", "minilm-l6"], "at least two classes"),
    "unreadable image": (["--train", "{images}", "--model", "efficientnet-lite0"], "broken.png"),
    "non-UTF-8 text": (["--train", "{latin1}", "--model", "minilm-l6"], "not UTF-8"),
    "unknown model": (["--train", "{train}", "--model", "minilm-l12"], "did you mean 'minilm-l6'? (packaged: minilm-l6, efficientnet-lite0"),
    "missing model folder": (["--train", "{train}", "--model", "./no-such-folder"], "model folder no-such-folder does not exist"),
    "unknown strategy": (["--train", "{train}", "--model", "minilm-l6", "--strategy", "lorra"], "choose one of bitfit, discriminative-lr, freeze-bottom, full"),
    "val file and fraction": (["--train", "{train}", "--val", "{train}", "--val-fraction", "0.2", "--model", "minilm-l6"], "not both"),
    "freeze layers without freeze-bottom": (["--train", "{train}", "--model", "minilm-l6", "--freeze-layers", "2"], "--strategy freeze-bottom"),
    "image model on text": (["--train", "{train}", "--model", "efficientnet-lite0"], "takes images"),
    "frozen BatchNorm without BatchNorm": (["--train", "{train}", "--model", "static-64", "--freeze-batchnorm"],
                                          "has no BatchNorm layers"),
    "bad number": (["--train", "{train}", "--model", "minilm-l6", "--epochs", "two"], "'epochs'"),
    "resume without a run": (["--out", "{tmp}/never", "--resume"], "nothing to resume"),
    "resume with other options": (["--out", "{tmp}/never", "--resume", "--epochs", "3"], "drop epochs"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_mistake_gives_one_line_and_exit_code_2(case, files, tmp_path, capsys):
    argv, expected = CASES[case]
    values = {**{k: str(v) for k, v in files.items()}, "tmp": str(tmp_path)}
    argv = [a.format(**values) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "run")]
    # In-process: any exception other than a handled UserError would fail the test with its traceback.
    assert main(["fit", *argv]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("transferkit: error:"), lines
    assert expected in lines[0]
    assert not (tmp_path / "run").exists()


def test_existing_run_directory_is_not_overwritten_silently(files, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    result = subprocess.run([sys.executable, "-m", "transferkit", "fit", "--train", str(files["train"]), "--model",
                             "minilm-l6", "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert (tmp_path / "run" / "keep.txt").read_text() == "mine"


def test_a_user_mistake_in_a_real_process_prints_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "transferkit", "predict", str(tmp_path), "--input", "x.csv",
                             "--output", str(tmp_path / "p.csv")], capture_output=True, text=True)
    assert result.returncode == 2 and "no finished model" in result.stderr



def test_a_hub_model_on_an_offline_machine_is_one_line_about_the_connection(files, tmp_path):
    """Not a vision-processor error from the fallback, nor a second round of download retries: the hub is out of
    reach, and the line says what to do instead."""
    import os

    result = subprocess.run([sys.executable, "-m", "transferkit", "fit", "--train", str(files["train"]), "--model",
                             "no-such-org/no-such-model", "--out", str(tmp_path / "run")], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("transferkit: error:")]
    assert len(error) == 1 and "the hub is not reachable" in error[0] and "image processor" not in error[0]
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()

def test_help_loads_no_torch():
    # `transferkit --help` and the argument errors answer at once: the heavy libraries load when a command runs.
    code = ("import sys; from transferkit.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'sklearn') if m in sys.modules))")
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_package_names_stay_the_functions_after_their_modules_load():
    import transferkit
    import transferkit.finetune  # noqa: F401  (sets the package attribute to the submodule in plain Python)
    import transferkit.lr_find  # noqa: F401

    assert callable(transferkit.finetune) and callable(transferkit.lr_find)


def test_hub_ids_with_and_without_an_organisation_are_hub_names_and_near_misses_are_typos():
    from transferkit.backbones.registry import is_hub_name

    for name in ("google-bert/bert-base-uncased", "bert-base-uncased", "roberta-base", "distilbert-base-uncased"):
        assert is_hub_name(name), name
    for name in ("./models/bert", "/abs/path", "two words", "a/b/c"):
        assert not is_hub_name(name), name
    with pytest.raises(UserError, match="did you mean 'efficientnet-lite0'"):
        is_hub_name("efficientnet_lite0")


def test_every_command_that_reads_data_takes_data_as_well_as_its_own_flag():
    from transferkit.cli import build_parser

    parser = build_parser()
    for command in ("fit", "distill", "lr-find", "rank"):
        extra = ["--models", "minilm-l6"] if command == "rank" else []
        assert parser.parse_args([command, "--data", "d.csv", *extra]).train == "d.csv", command
    assert parser.parse_args(["pretrain", "--model", "minilm-l6", "--data", "t.txt", "--out", "o"]).text_data == "t.txt"
