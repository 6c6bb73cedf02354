"""A small synthetic output root for the decision tests: one ranked night, written with the
project's table writer (no model run), plus helpers to run ``pairx review`` as a real process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from PIL import Image

MODEL = "model-a"
NIGHT_RUN = "night-1"
INDIVIDUALS = ("ind-a", "ind-b", "ind-c", "ind-d")


def query_uri(out: Path, number: int) -> str:
    return str(out / "photos" / f"upload-{number}.png")


def gallery_uri(out: Path, individual: str) -> str:
    return str(out / "photos" / f"{individual}.png")


def write_output(out: Path, uploads: int = 3) -> Path:
    """``uploads`` uploads, each with 3 ranked candidates (ind-a..ind-d), photos on disk.

    Upload ``i``'s candidate ranks: re-ranked order rotates the individuals by ``i``; its
    similarity order is the reverse of the first two, so rank 0 has retrieval rank 1.
    """
    from infra.tables import with_nulls, write_table

    photos = out / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    for n, name in enumerate(INDIVIDUALS):
        Image.new("RGB", (40, 30), (60 * n, 90, 120)).save(photos / f"{name}.png")
    candidates, images = [], []
    for i in range(uploads):
        Image.new("RGB", (40, 30), (20, 40 * i, 200)).save(photos / f"upload-{i}.png")
        images.append({"image_uri": query_uri(out, i), "content_hash": f"{i:064x}", "width": 40, "height": 30})
        for rank in range(3):
            individual = INDIVIDUALS[(i + rank) % len(INDIVIDUALS)]
            candidates.append({
                "query": query_uri(out, i), "rank": rank, "gallery_image": gallery_uri(out, individual),
                "individual": individual, "similarity": [0.8, 0.9, 0.5][rank], "irm": [0.9, 0.3, 0.2][rank],
                "rerank_score": [0.85, 0.6, 0.35][rank], "retrieval_rank": [1, 0, 2][rank], "explained": True,
                "run_id": NIGHT_RUN, "output_key": f"key-{i}-{rank}"})
    # upload 0 was explained on a crop: its decisions record the box
    pairs = [{"pair_id": "p-0-0", "image_0": query_uri(out, 0), "image_1": candidates[0]["gallery_image"],
              "layer": "blocks.3", "output_key": "key-0-0", "box_0": [2.0, 3.0, 30.0, 20.0], "run_id": NIGHT_RUN}]
    write_table(str(out), "pairs", with_nulls("pairs", pairs), MODEL, NIGHT_RUN)
    write_table(str(out), "candidates", with_nulls("candidates", candidates), MODEL, NIGHT_RUN)
    write_table(str(out), "images", with_nulls("images", images), MODEL, NIGHT_RUN)
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(out: Path, port: int, log: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    """``pairx review OUT --port PORT`` as a process; returns once it answers."""
    command = [sys.executable, "-m", "flows.cli", "review", str(out), "--port", str(port), *extra]
    environment = {**os.environ, **(env or {})}
    with open(log, "ab") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=environment,
                                   cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"review server exited {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/decisions", timeout=2).read()
            return process
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.2)
    process.kill()
    raise AssertionError(f"review server did not answer:\n{log.read_text()[-3000:]}")


def post(port: int, body: dict, token: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/decisions", data=json.dumps(body).encode(),
                                     headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


FRAME_HASH = "f" * 64
#: the two detections of the camera-trap frame :func:`write_frame` writes: (index, id, box in pixels)
FRAME_DETECTIONS = ((0, "det0aaaaaaaaaaaa", [1.0, 2.0, 15.0, 12.0]), (1, "det1bbbbbbbbbbbb", [20.0, 10.0, 18.0, 15.0]))


def frame_uri(out: Path) -> str:
    return str(out / "photos" / "frame.png")


def write_frame(out: Path) -> str:
    """A camera-trap frame with two animals ranked detection by detection on night ``NIGHT_RUN``
    (candidates ``query_detection``/``query_detection_id``/``query_box`` set), beside
    :func:`write_output`'s uploads; returns the frame's URI. Detection ``i`` ranks ``ind-a``/``ind-b``
    first when ``i`` is 0/1."""
    from infra.tables import with_nulls, write_table

    Image.new("RGB", (40, 30), (10, 200, 10)).save(out / "photos" / "frame.png")
    candidates = []
    for index, detection_id, box in FRAME_DETECTIONS:
        for rank in range(2):
            individual = INDIVIDUALS[(index + rank) % 2]
            candidates.append({
                "query": frame_uri(out), "rank": rank, "gallery_image": gallery_uri(out, individual),
                "individual": individual, "similarity": [0.9, 0.7][rank], "irm": [0.5, 0.2][rank],
                "rerank_score": [0.7, 0.45][rank], "retrieval_rank": rank, "explained": True, "run_id": NIGHT_RUN,
                "output_key": f"key-frame-{index}-{rank}", "query_hash": FRAME_HASH, "query_detection": index,
                "query_detection_id": detection_id, "query_box": box})
    write_table(str(out), "candidates", with_nulls("candidates", candidates), MODEL, NIGHT_RUN)
    return frame_uri(out)
