"""The HTTP server, tested through real HTTP on an ephemeral loopback port."""

from __future__ import annotations

import base64
import csv
import io
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from transferkit.cli import main
from transferkit.deploy import OnnxPredictor, TorchPredictor, export_onnx
from transferkit.deploy.server import ServeLimits, create_app

from ..conftest import make_sentences
from .conftest import LiveServer


def _predict_csv(run, input_path, tmp_path) -> list[dict]:
    out = tmp_path / "preds.csv"
    assert main(["predict", str(run), "--input", str(input_path), "--output", str(out)]) == 0
    return list(csv.DictReader(open(out, encoding="utf-8")))


def test_concurrent_requests_are_batched_and_match_transferkit_predict(text_run, tmp_path):
    test_file = text_run.parent / "test.csv"
    expected = _predict_csv(text_run, test_file, tmp_path)
    texts = [row["input"] for row in expected]
    # A long wait makes batching certain: all 20 concurrent requests arrive within it.
    app = create_app(TorchPredictor.load(text_run), run=text_run, max_batch_size=64, max_wait_ms=300)
    with LiveServer(app) as server, ThreadPoolExecutor(20) as pool:
        def ask(chunk):
            response = httpx.post(f"{server.url}/predict", json={"texts": chunk}, timeout=30)
            assert response.status_code == 200, response.text
            return response.json()["predictions"]

        chunks = [texts[i:i + 3] for i in range(0, len(texts), 3)]
        answers = [p for chunk in pool.map(ask, chunks) for p in chunk]
        health = httpx.get(f"{server.url}/health").json()
        metadata = httpx.get(f"{server.url}/metadata").json()
    assert len(answers) == len(expected) == 60
    for row, answer in zip(expected, answers):
        assert answer["label"] == row["label"] and answer["truncated"] is False
        for c in ("neg", "pos"):
            assert abs(answer["probabilities"][c] - float(row[f"p_{c}"])) < 1e-5
    assert health["requests"] == len(chunks) and health["inputs"] == 60
    assert health["forward_passes"] < len(chunks) and health["largest_batch"] > 3
    assert metadata["classes"] == ["neg", "pos"] and metadata["strategy"] == "lora"
    assert metadata["metrics"]["test_accuracy"] == json.loads((text_run / "metrics.json").read_text())["test"]["accuracy"]


def test_bad_requests_get_json_4xx_and_the_server_keeps_answering(text_run):
    limits = ServeLimits(max_items=4, max_text_chars=700, max_body_bytes=1500)
    app = create_app(TorchPredictor.load(text_run), run=text_run, limits=limits)
    bad = [
        ({"json": {"texts": []}}, 422, "is empty"),
        ({"json": {"texts": ["good"] * 5}}, 422, "over the limit of 4"),
        ({"json": {"texts": ["x" * 701]}}, 422, "701 characters"),
        ({"json": {"images": ["aGk="]}}, 422, "takes texts"),
        ({"json": {}}, 422, "under 'texts'"),
        ({"json": {"texts": ["good"], "task": "a"}}, 422, "invalid request"),
        ({"json": {"texts": "good"}}, 422, "invalid request"),
        ({"json": {"texts": [3]}}, 422, "invalid request"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 422, "invalid request"),
        ({"content": b"good film", "headers": {"content-type": "text/plain"}}, 415, "application/json"),
        ({"json": {"texts": ["good " * 99] * 4}}, 413, "over the limit of 1500"),
    ]
    with LiveServer(app) as server:
        for kwargs, status, message in bad:
            response = httpx.post(f"{server.url}/predict", **kwargs)
            assert response.status_code == status, (kwargs, response.text)
            assert message in response.json()["error"], (kwargs, response.text)
        assert httpx.get(f"{server.url}/predict").status_code == 405
        assert httpx.get(f"{server.url}/nowhere").json() == {"error": "Not Found"}
        # Over the model's token limit: truncated as in training, and said so.
        long_text = "good " * 300
        response = httpx.post(f"{server.url}/predict", json={"texts": ["good film", long_text[:699]]})
        assert response.status_code == 200
        assert [p["truncated"] for p in response.json()["predictions"]] == [False, True]
        assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_bearer_token_auth(text_run):
    app = create_app(TorchPredictor.load(text_run), run=text_run, token="s3cret")
    body = {"texts": ["good film"]}
    with LiveServer(app) as server:
        assert httpx.post(f"{server.url}/predict", json=body).status_code == 401
        wrong = httpx.post(f"{server.url}/predict", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "bearer token" in wrong.json()["error"]
        assert httpx.get(f"{server.url}/metadata").status_code == 401
        assert httpx.post(f"{server.url}/predict", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(f"{server.url}/health").status_code == 200  # open, for load balancers


def _png(array: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_image_server_matches_predict_and_rejects_non_images(image_run, tmp_path):
    from PIL import Image

    folder = image_run.parent / "images"
    expected = _predict_csv(image_run, folder, tmp_path)
    payload = [_png(np.array(Image.open(row["input"]).convert("RGB"))) for row in expected]
    app = create_app(TorchPredictor.load(image_run), run=image_run)
    with LiveServer(app) as server:
        response = httpx.post(f"{server.url}/predict", json={"images": payload[:32]})
        assert response.status_code == 200
        for row, answer in zip(expected, response.json()["predictions"]):
            assert answer["label"] == row["label"] and "truncated" not in answer
            assert abs(answer["probabilities"]["vertical"] - float(row["p_vertical"])) < 1e-5
        not_base64 = httpx.post(f"{server.url}/predict", json={"images": ["%%%"]})
        assert not_base64.status_code == 422 and "not valid base64" in not_base64.json()["error"]
        not_image = httpx.post(f"{server.url}/predict", json={"images": [payload[0], base64.b64encode(b"hello").decode()]})
        assert not_image.status_code == 422 and "images[1] is not a readable image" in not_image.json()["error"]
        assert httpx.post(f"{server.url}/predict", json={"texts": ["a"]}).status_code == 422


def test_onnx_runtime_serves_the_same_predictions(text_run, tmp_path):
    onnx_path = tmp_path / "m.onnx"
    export_onnx(text_run, onnx_path)
    texts = [t for t, _ in make_sentences(12, seed=5)]
    answers = {}
    for predictor in (TorchPredictor.load(text_run), OnnxPredictor(text_run, onnx_path)):
        with LiveServer(create_app(predictor, run=text_run)) as server:
            answers[predictor.runtime] = httpx.post(f"{server.url}/predict", json={"texts": texts}).json()["predictions"]
            assert httpx.get(f"{server.url}/metadata").json()["runtime"] == predictor.runtime
    for a, b in zip(answers["torch"], answers["onnx"]):
        assert a["label"] == b["label"] and abs(a["probabilities"]["pos"] - b["probabilities"]["pos"]) < 1e-5


# Runs the CLI with PyTorch and transformers made unimportable, as on a machine where they are not installed.
WITHOUT_TORCH = """
import importlib.abc, runpy, sys
class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name.split(".")[0])
sys.meta_path.insert(0, NotInstalled())
sys.argv[0] = "transferkit"
runpy.run_module("transferkit", run_name="__main__")
"""


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_onnx_runtime_serves_without_pytorch_installed(text_run, tmp_path):
    import time

    onnx_path = tmp_path / "m.onnx"
    export_onnx(text_run, onnx_path)
    texts = [t for t, _ in make_sentences(10, seed=9)] + ["good " * 200]  # the last one is cut at max_length
    expected = TorchPredictor.load(text_run)
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-c", WITHOUT_TORCH, "serve", str(text_run), "--runtime", "onnx",
                               "--onnx", str(onnx_path), "--port", str(port), "--log-level", "warning"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while True:
            assert server.poll() is None, server.stdout.read()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "the torch-free server did not start within 120 s"
            time.sleep(0.3)
        answers = httpx.post(f"http://127.0.0.1:{port}/predict", json={"texts": texts}).json()["predictions"]
        assert httpx.get(f"http://127.0.0.1:{port}/metadata").json()["runtime"] == "onnx"
    finally:
        server.terminate()
        server.wait(timeout=30)
    probabilities = expected.predict_proba(texts)
    for answer, row, cut in zip(answers, probabilities, expected.truncated(texts)):
        assert answer["label"] == expected.classes[int(row.argmax())] and answer["truncated"] is cut
        assert abs(answer["probabilities"]["pos"] - row[expected.classes.index("pos")]) < 1e-5
    assert answers[-1]["truncated"] is True


def test_commands_that_need_pytorch_say_so_on_a_serving_only_install(tmp_path):
    result = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, "fit", "--train", str(tmp_path / "a.csv"),
                             "--model", "minilm-l6", "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "'transferkit fit' needs torch, which is not installed" in result.stderr


def test_onnx_runtime_predicts_images_as_pytorch_does(image_run, tmp_path):
    from PIL import Image

    onnx_path = tmp_path / "m.onnx"
    export_onnx(image_run, onnx_path)
    images = [np.array(Image.open(p).convert("RGB")) for p in sorted((image_run.parent / "images").rglob("*.png"))]
    # Other sizes than training's: the central square is cut and resized, in NumPy on the ONNX path.
    images += [np.pad(images[0], ((0, 7), (3, 0), (0, 0)), mode="edge"), np.kron(images[1], np.ones((3, 3, 1), np.uint8))]
    torch_probabilities = TorchPredictor.load(image_run).predict_proba(images)
    onnx_probabilities = OnnxPredictor(image_run, onnx_path, batch_size=8).predict_proba(images)
    assert np.abs(torch_probabilities - onnx_probabilities).max() < 1e-5


def test_fuzzing_the_openapi_schema_finds_no_server_error(text_run):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode

    app = create_app(TorchPredictor.load(text_run), run=text_run, limits=ServeLimits(max_items=8), token="t0ken")
    with LiveServer(app) as server:
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=schema.as_strategy(generation_mode=mode))
            @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
            def fuzz(case):
                case.call_and_validate(base_url=server.url, headers={"Authorization": "Bearer t0ken"},
                                       checks=[not_a_server_error])

            fuzz()
        assert httpx.post(f"{server.url}/predict", json={"texts": ["good"]},
                          headers={"Authorization": "Bearer t0ken"}).status_code == 200


def test_serve_cli_refuses_a_missing_run(tmp_path):
    result = subprocess.run([sys.executable, "-m", "transferkit", "serve", str(tmp_path / "missing")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, "-m", "transferkit", "serve", str(tmp_path), "--runtime", "onnx"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no finished model" in result.stderr
