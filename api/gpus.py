"""The ``/api/v1/gpus`` resource: the GPUs for which telemetry is stored."""

from __future__ import annotations

from typing import Any

from apiflask import APIBlueprint, HTTPError
from marshmallow import RAISE

from api.auth import token_auth
from api.database import get_engine
from api.queries import GpuSummary, fetch_gpu, fetch_gpus
from api.schemas import (
    API_ERROR_RESPONSES,
    GpuDetailSchema,
    GpuListQuery,
    GpuListSchema,
    NoQuery,
)

__all__ = ["gpu_not_found", "gpus_blueprint"]

gpus_blueprint = APIBlueprint("gpus", __name__, url_prefix="/api/v1/gpus", tag="GPUs")

_GPU_EXAMPLE = {
    "id": "GPU-5fd4f087-86f3-7a43-b711-4771313afc50",
    "hostname": "mtv5-dgx1-hgpu-031",
    "gpu_index": 0,
    "device": "nvidia0",
    "model_name": "NVIDIA H100 80GB HBM3",
    "first_seen": "2025-07-18T20:42:34Z",
    "last_seen": "2025-07-18T20:42:37Z",
    "metric_names": ["DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_GPU_UTIL"],
}


@gpus_blueprint.get("")
@gpus_blueprint.auth_required(token_auth)
@gpus_blueprint.input(GpuListQuery, location="query", arg_name="query", unknown=RAISE)
@gpus_blueprint.output(GpuListSchema, example={"items": [_GPU_EXAMPLE], "count": 1})
@gpus_blueprint.doc(summary="List GPUs", responses=API_ERROR_RESPONSES)
def list_gpus(query: dict[str, Any]) -> dict[str, Any]:
    """Return every GPU with stored telemetry, ordered by hostname, GPU index and uuid."""
    with get_engine().connect() as connection:
        gpus = fetch_gpus(connection, hostname=query.get("hostname"))
    return {"items": gpus, "count": len(gpus)}


@gpus_blueprint.get("/<id>")
@gpus_blueprint.auth_required(token_auth)
@gpus_blueprint.input(NoQuery, location="query", arg_name="query", unknown=RAISE)
@gpus_blueprint.output(GpuDetailSchema, example=_GPU_EXAMPLE)
@gpus_blueprint.doc(
    summary="Get one GPU",
    responses={**API_ERROR_RESPONSES, 404: "No telemetry is stored for a GPU with this id."},
)
def get_gpu(id: str, query: dict[str, Any]) -> GpuSummary:
    """Return the GPU with the uuid ``id``."""
    with get_engine().connect() as connection:
        gpu = fetch_gpu(connection, id)
    if gpu is None:
        raise gpu_not_found(id)
    return gpu


def gpu_not_found(gpu_id: str) -> HTTPError:
    """Return the 404 error for a GPU id with no stored telemetry."""
    return HTTPError(
        404,
        detail=f"no telemetry is stored for a GPU with id {gpu_id!r}: list GPUs at /api/v1/gpus",
    )
