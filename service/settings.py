"""All configuration, from `CERVIGATE_*` environment variables (or a `.env` file), in one place."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.sizing import available_cpus

REPO_MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
CAPTURE_APP_DIR = Path(__file__).resolve().parent / "web" / "static"  # what `make web` builds


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CERVIGATE_", env_file=".env", extra="ignore")

    # Where to listen (`python -m service`, `make serve`).
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # HTTPS: a phone's browser opens the camera only on a secure page (https://, or localhost), so a capture
    # app used from phones on the clinic LAN needs a certificate (README: HTTPS on the clinic network).
    tls_certfile: Path | None = Field(default=None, description="PEM certificate (chain); with tls_keyfile")
    tls_keyfile: Path | None = Field(default=None, description="PEM private key of tls_certfile")
    capture_app: bool = Field(default=True, description="serve the capture web app at /capture/")
    capture_app_dir: Path = Field(default=CAPTURE_APP_DIR, description="the capture app's built files")

    # Models and ONNX Runtime.
    models_dir: Path = Field(
        default=REPO_MODELS_DIR, description="holds detector/, quality/, segmenter/, severity/"
    )
    providers: list[str] = Field(
        default=["CPUExecutionProvider"],
        description='ONNX Runtime execution providers in order of preference, e.g. ["CUDAExecutionProvider", '
        '"CPUExecutionProvider"] with the onnxruntime-gpu build',
    )
    # Where the models run: ONNX Runtime in this process, or a remote Open Inference Protocol (KServe V2)
    # server such as Triton or KServe, which gets the prepared tensors (README: Deployment).
    inference_backend: Literal["onnxruntime", "remote"] = "onnxruntime"
    remote_url: str = Field(default="", description="the V2 REST base URL, e.g. http://triton:8000")
    remote_model_version: str = Field(default="", description="model version to call; empty = the server's")
    remote_timeout_s: float = Field(
        default=2.0,
        gt=0,
        description="per model call; a call that takes longer gets 504 (a call runs 5-40 ms)",
    )
    remote_retries: int = Field(
        default=2, ge=0, description="retries of a call refused with 503 or unreachable"
    )
    remote_backoff_s: float = Field(
        default=0.05, ge=0, description="first retry's wait, doubled for each next"
    )
    remote_startup_wait_s: float = Field(
        default=120.0, ge=0, description="how long start-up waits for the remote models to be ready"
    )
    intra_op_threads: int = Field(
        default=1, ge=0, description="threads per model run; 0 = ONNX Runtime's default"
    )
    ort_spinning: bool = Field(
        default=False,
        description="let ONNX Runtime's worker threads busy-wait between runs (only with >1 thread)",
    )
    inference_workers: int = Field(
        default_factory=available_cpus,
        ge=1,
        description="requests processed at once; the rest wait in the queue. Default: the CPUs this process "
        "may use (its affinity, capped by a container's CPU quota), not the host's cores",
    )
    overlap_stages: bool = Field(
        default=True,
        description="when a compute slot is idle, run one request's independent stages on it in parallel "
        "(the quality model with the segmenter); never borrows a busy slot",
    )
    max_inflight: int = Field(
        default=32, ge=1, description="requests admitted (processing + queued); more are shed with 503"
    )
    retry_after_s: int = Field(default=1, ge=0, description="Retry-After sent with a 503")

    # Access. Keys are compared as SHA-256 digests; `sha256:<hex>` entries keep plaintext out of config.
    api_keys: list[str] = Field(
        default=[], description='keys for /v1/* (JSON list, e.g. ["sha256:9f86..."]); empty = open'
    )
    metrics_api_keys: list[str] = Field(
        default=[], description="keys for /metrics (a Prometheus bearer token); empty = open"
    )
    cors_origins: list[str] = Field(
        default=[],
        description='browser origins allowed to call the API, e.g. ["https://app.example.org"]; '
        "empty = no cross-origin access",
    )

    # Shutdown: SIGTERM turns /readyz to 503 for `shutdown_drain_s` while still serving; then requests
    # in flight get up to `shutdown_grace_s` to finish (the sum must stay under compose's 35 s).
    shutdown_drain_s: float = Field(default=3.0, ge=0)
    shutdown_grace_s: float = Field(default=30.0, ge=1)

    # Input limits.
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, ge=1, description="larger uploads get 413")
    max_pixels: int = Field(
        default=50_000_000,
        ge=1,
        description="width x height above this gets 413 (50 MP phones' full mode fits)",
    )
    max_exam_photos: int = Field(
        default=12, ge=1, le=64, description="photos one /v1/exams request may carry"
    )
    max_exam_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1,
        description="a /v1/exams body over this gets 413 (each photo: max_upload_bytes)",
    )
    request_deadline_s: float = Field(
        default=10.0,
        gt=0,
        description="queueing plus processing of one photo beyond this gets 504 (each photo of an exam "
        "gets its own, from its turn); the phone retries",
    )
    upload_timeout_s: float = Field(
        default=30.0, gt=0, description="a request body not received within this gets 408"
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="request headers not complete within this (from the connection or the request's first "
        "byte) get 408 header_timeout and the connection closes (slowloris)",
    )
    max_header_bytes: int = Field(
        default=64 * 1024,
        ge=1024,
        description="request line and headers over this get 431 headers_too_large; nothing more is buffered",
    )
    malloc_mmap_threshold_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=0,
        description="`python -m service` has glibc give allocations this large their own mappings, freed "
        "back to the system, so big photo buffers do not stay resident (0 = glibc's own, growing threshold)",
    )
    refused_body_drain_bytes: int = Field(
        default=1024 * 1024 * 1024,
        ge=0,
        description="after refusing a request (413, 401, 503...), read and discard up to this much of the "
        "body the client is still sending, so it sees the answer, not a reset; past it the connection closes",
    )
    refused_body_drain_s: float = Field(
        default=30.0,
        ge=0,
        description="...and for at most this long, as nginx's lingering_time (a slow sender is cut off)",
    )
    idempotency_window_s: float = Field(
        default=86400.0,
        gt=0,
        description="a repeated Idempotency-Key within this many seconds gets the stored answer again",
    )
    idempotency_max_bytes: int = Field(
        default=32 * 1024 * 1024,
        ge=0,
        description="memory for stored Idempotency-Key answers (~100 KB with an overlay); LRU beyond it",
    )
    min_image_side: int = Field(default=64, ge=1, description="images with a shorter side get 422")
    decode_min_side: int = Field(
        default=320,
        ge=64,
        description="JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8) keeping this short side; "
        "the cervix crop is decoded finer when it needs more pixels",
    )

    # Decision rules that are product choices rather than model properties.
    cervix_typicality_gate: bool = Field(
        default=True,
        description="also ask for a recapture when the photo is unlike every cervix photo the detector "
        "learned from (its manifest's cervix_distance threshold); turn off only to try a new device's photos",
    )
    focus_operating_point: Literal["balanced", "high_sensitivity"] = Field(
        default="high_sensitivity",
        description="which 'not sharp' threshold of the quality manifest to use: not_sharp (the 98 % "
        "sensitivity rule; quality 3.4.0's inner folds kept 93-98 % specificity at it) or "
        "not_sharp_balanced (95 %, fewer retakes of sharp photos; see README)",
    )
    min_cervix_area_fraction: float = Field(
        default=1 / 16,
        gt=0,
        lt=1,
        description="a cervix box smaller than this share of the photo (a quarter of its width times a "
        "quarter of its height): cervix_too_small",
    )
    min_cervix_crop_px: int | None = Field(
        default=None,
        ge=1,
        description="a cervix narrower than this many original pixels: cervix_too_small. Default: the "
        "quality manifest's extra.min_cervix_px, the smallest cervix that model was trained to judge (a "
        "smaller one's crop is upsampled further than its training crops were and focus cannot be judged)",
    )
    cut_off_max_extent: float = Field(
        default=0.6,
        gt=0,
        le=1,
        description="a cervix touching one frame edge (not the opposite one) and spanning less than this "
        "share of the frame along that axis: cervix_cut_off",
    )

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("set both CERVIGATE_TLS_CERTFILE and CERVIGATE_TLS_KEYFILE, or neither")
        for path in (self.tls_certfile, self.tls_keyfile):
            if path is not None and not path.is_file():
                raise ValueError(f"TLS file {path} does not exist: give the path of a PEM file")
        return self

    @model_validator(mode="after")
    def _remote_url(self) -> Settings:
        if self.inference_backend == "remote" and not self.remote_url.startswith(("http://", "https://")):
            raise ValueError(
                "CERVIGATE_INFERENCE_BACKEND=remote needs CERVIGATE_REMOTE_URL=http(s)://host:port"
            )
        return self

    @property
    def heif_decode_threads(self) -> int:
        """libheif threads per HEIC decode (a grid photo's tiles decode in parallel): each worker's share
        of the cores, doubled where `overlap_stages` lets a request borrow an idle core, so a lone iPhone
        photo decodes on two cores; under load the extra thread only shares its worker's core."""
        cores = available_cpus()
        share = max(1, cores // self.inference_workers)
        borrows = self.overlap_stages and self.inference_workers > 1
        return min(cores, share * 2) if borrows else share
