"""``transferkit serve``: a run's model over HTTP (FastAPI + uvicorn) with dynamic micro-batching.

Endpoints: ``POST /predict`` (JSON ``{"texts": [...]}`` or ``{"images": [base64, ...]}``; labels and
class probabilities back), ``GET /health`` (no auth, for load balancers; batching counters),
``GET /metadata`` (classes, backbone, strategy, the run's metrics, limits), and the OpenAPI docs at
``/docs``. Every error is JSON ``{"error": "..."}`` with a 4xx code: 401 missing or wrong token,
411/413/415 for the body's length or type, 422 for content the model cannot take. Texts longer than
the model's maximum length are truncated (as in training) and flagged ``"truncated": true``.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations at runtime,
# and the request models are defined inside create_app (pydantic is imported only when serving).
import base64
import binascii
import io
import json
import logging
import os
import secrets
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..data.dataset import to_rgb_array
from ..errors import UserError
from .batching import MicroBatcher
from .predictors import Predictor, load_predictor

TOKEN_ENV = "TRANSFERKIT_TOKEN"
log = logging.getLogger("transferkit.serve")


@dataclass(frozen=True)
class ServeLimits:
    max_items: int = 64            # inputs per request
    max_text_chars: int = 20_000   # characters per text (the tokenizer truncates to max length anyway)
    max_body_bytes: int = 16 << 20  # whole request body
    max_image_pixels: int = 25_000_000  # decoded width x height, against decompression bombs


def _import_web():
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError("serving needs FastAPI and uvicorn: pip install 'transferkit[deploy]'") from None


def _run_metadata(run: Path, predictor: Predictor) -> dict:
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    task = getattr(predictor, "task", None)
    if task is not None:  # one task of a multi-task run: that task's results
        metrics = {**metrics, **metrics.get("tasks", {}).get(task, {})}
    test = metrics.get("test", {})
    baseline = (metrics.get("baseline") or {}).get("test", {})
    return {"run": run.name, "task": task, "modality": predictor.modality, "classes": predictor.classes,
            "backbone": predictor.backbone_spec, "model": metrics.get("model"), "strategy": metrics.get("strategy"),
            "runtime": predictor.runtime,
            "metrics": {"test_accuracy": test.get("accuracy"), "test_macro_f1": test.get("macro_f1"),
                        "baseline_test_accuracy": baseline.get("accuracy"), "test_examples": metrics.get("data", {}).get("test")}}


class _RequestGate:
    """Pure ASGI middleware: reject a POST whose body is not JSON or too large before anything reads it."""

    def __init__(self, app, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            from fastapi.responses import JSONResponse

            headers = dict(scope["headers"])
            content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            length = headers.get(b"content-length")
            problem = None
            if content_type != b"application/json":
                problem = (415, f"content type must be application/json, got '{content_type.decode('latin-1') or 'none'}'")
            elif length is None:
                problem = (411, "send a Content-Length header (chunked request bodies are not accepted)")
            elif not length.strip().isdigit():
                problem = (400, "Content-Length is not a number")
            elif int(length) > self.max_body_bytes:
                problem = (413, f"request body of {int(length)} bytes is over the limit of {self.max_body_bytes}: "
                                f"send fewer or smaller items per request")
            if problem:
                await JSONResponse({"error": problem[1]}, status_code=problem[0])(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(predictor: Predictor, *, run: str | Path = ".", max_batch_size: int = 32, max_wait_ms: float = 5.0,
               limits: ServeLimits = ServeLimits(), token: str | None = None):
    """The FastAPI application serving ``predictor``; ``token`` (if set) is required as a bearer token."""
    _import_web()
    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException as StarletteHTTPException

    run = Path(run)
    batcher = MicroBatcher(predictor.predict_proba, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms)
    metadata = _run_metadata(run, predictor)
    metadata["limits"] = asdict(limits)
    metadata["batching"] = {"max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms}
    metadata["auth"] = token is not None
    text_limit = int(predictor.backbone_spec.get("max_length", 0) or 0)

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title=f"transferkit: {run.name}", version="1", lifespan=lifespan,
                  description=f"A {predictor.modality} classifier over {len(predictor.classes)} classes, fine-tuned with transferkit.")
    app.add_middleware(_RequestGate, max_body_bytes=limits.max_body_bytes)

    bearer = HTTPBearer(auto_error=False, description=f"required when the server was started with --token or ${TOKEN_ENV}")

    def authorised(credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        if token is None:
            return
        if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})

    class PredictRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        texts: Optional[list[str]] = Field(None, description="texts to classify (for text models)")
        images: Optional[list[str]] = Field(None, description="base64-encoded image files, PNG/JPEG/... (for image models)")

    class Prediction(BaseModel):
        label: str
        probabilities: dict[str, float]
        truncated: Optional[bool] = Field(None, description="text models: the text was longer than the model's "
                                                            "maximum length and only its first tokens were used")

    class PredictResponse(BaseModel):
        predictions: list[Prediction]

    class ErrorResponse(BaseModel):
        error: str

    errors = {code: {"model": ErrorResponse} for code in (401, 411, 413, 415, 422)}

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "body"
        return JSONResponse({"error": f"invalid request: {where}: {first.get('msg', 'malformed')}"}, status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        log.exception("prediction failed")
        return JSONResponse({"error": f"internal error ({type(error).__name__}); the server keeps running"}, status_code=500)

    def reject(message: str):
        raise HTTPException(422, message)

    def decode_images(items: list[str]) -> list[np.ndarray]:
        from PIL import Image, UnidentifiedImageError

        decoded = []
        for i, item in enumerate(items):
            try:
                raw = base64.b64decode(item, validate=True)
            except (binascii.Error, ValueError):
                reject(f"images[{i}] is not valid base64: encode the image file's bytes with base64")
            try:
                with Image.open(io.BytesIO(raw)) as image:
                    if image.width * image.height > limits.max_image_pixels:
                        reject(f"images[{i}] has {image.width}x{image.height} pixels, over the limit of "
                               f"{limits.max_image_pixels}: resize it first")
                    decoded.append(to_rgb_array(image))
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
                reject(f"images[{i}] is not a readable image file (PNG, JPEG, BMP, ...)")
        return decoded

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", **{k: v for k, v in asdict(batcher.stats).items() if k != "started"}}

    @app.get("/metadata", dependencies=[Depends(authorised)], responses=errors)
    async def get_metadata() -> dict:
        return metadata

    @app.post("/predict", dependencies=[Depends(authorised)], response_model=PredictResponse, responses=errors,
              response_model_exclude_none=True)
    async def predict(request: PredictRequest) -> dict:
        wanted, other = ("texts", "images") if predictor.modality == "text" else ("images", "texts")
        items = getattr(request, wanted)
        if getattr(request, other) is not None:
            reject(f"this model takes {predictor.modality}s: send them as '{wanted}', not '{other}'")
        if items is None:
            reject(f"send the inputs as a JSON list under '{wanted}'")
        if not items:
            reject(f"'{wanted}' is empty: send at least one")
        if len(items) > limits.max_items:
            reject(f"'{wanted}' has {len(items)} items, over the limit of {limits.max_items}: split the request")
        truncated = None
        if predictor.modality == "text":
            for i, text in enumerate(items):
                if len(text) > limits.max_text_chars:
                    reject(f"texts[{i}] has {len(text)} characters, over the limit of {limits.max_text_chars}")
            # A text can exceed the token limit only if its UTF-8 bytes (plus special tokens) do: every
            # token covers at least one byte. Only such texts are tokenised here.
            long = [i for i, t in enumerate(items) if len(t.encode("utf-8", "replace")) + 4 > text_limit]
            truncated = [False] * len(items)
            for i, flag in zip(long, predictor.truncated([items[i] for i in long]) if long else []):
                truncated[i] = flag
            inputs = items
        else:
            inputs = decode_images(items)
        probabilities = await batcher.submit(inputs)
        classes = predictor.classes
        return {"predictions": [
            {"label": classes[int(row.argmax())], "probabilities": {c: float(p) for c, p in zip(classes, row)},
             **({"truncated": truncated[i]} if truncated is not None else {})}
            for i, row in enumerate(probabilities)]}

    return app


def serve(run: str | Path, *, host: str = "127.0.0.1", port: int = 8000, runtime: str = "torch",
          onnx_path: str | Path | None = None, max_batch_size: int = 32, max_wait_ms: float = 5.0,
          limits: ServeLimits = ServeLimits(), token: str | None = None, log_level: str = "info",
          task: str | None = None) -> None:
    """Load ``run`` and serve it until interrupted; the model is loaded before the port opens."""
    _import_web()
    import uvicorn

    if max_batch_size < 1 or max_wait_ms < 0:
        raise UserError(f"--max-batch-size must be >= 1 and --max-wait-ms >= 0 (got {max_batch_size}, {max_wait_ms})")
    token = token if token is not None else os.environ.get(TOKEN_ENV) or None
    predictor = load_predictor(run, runtime, onnx_path, task)
    app = create_app(predictor, run=run, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, limits=limits, token=token)
    auth = "bearer token required" if token else "no auth"
    print(f"serving {run} ({predictor.modality}, {len(predictor.classes)} classes, {runtime}) on http://{host}:{port} "
          f"[{auth}; batches of up to {max_batch_size}, {max_wait_ms:g} ms wait]; docs at /docs", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=log_level in ("debug", "trace"))
