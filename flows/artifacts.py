"""What a run shows in the Prefect UI: tables, markdown, links, images and live progress of the stages.

Every card renders by itself in a browser: pictures are embedded (``data:`` URLs, in image cards and inside
markdown), links are http(s) only (a presigned URL for a file on S3, signed for the endpoint users reach:
``$REALS_PUBLIC_S3_ENDPOINT`` when set), and a local file is named in the text of its card, since a browser
opens no ``file://`` link from a web page. One card per picture; every card has a description.
"""
from __future__ import annotations

import base64
import contextvars
import os
import posixpath
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from prefect.artifacts import (
    create_image_artifact,
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from pipelines.report_parts import Card
from storage.fs import exists, filesystem, join, read_bytes, to_url, write_bytes_atomic

MAX_INLINE_IMAGE = 2 << 20  # PNGs up to 2 MiB are embedded in the artifact itself (data: URL)
LINK_EXPIRY = 7 * 24 * 3600  # presigned S3 links last a week (the longest SigV4 allows)
# The S3 endpoint a user's browser reaches, where it differs from the one the pipeline uses (compose: the
# services reach http://minio:9000, a browser on the host http://localhost:9000).
PUBLIC_ENDPOINT_VAR = "REALS_PUBLIC_S3_ENDPOINT"
IMAGE_REF = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")  # ![alt](target) in markdown


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key: lowercase letters, digits and dashes."""
    text = "-".join(parts).lower()
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


# ---------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------

def table(key: str, rows: list[dict], description: str) -> None:
    """A table artifact (one row per dict); an empty table still records that there was nothing."""
    create_table_artifact(rows or [{"note": "none"}], key=artifact_key(key), description=description)


def browser_url(url: str, content_type: str | None = None) -> str | None:
    """An address a browser opens for a stored file: a presigned URL on S3 (for ``$REALS_PUBLIC_S3_ENDPOINT``
    when set; served as ``content_type`` when given), the URL itself if http(s), else None (a local file, which
    a web page cannot link to)."""
    url = to_url(url)
    if url.startswith(("http://", "https://")):
        return url
    if url.startswith(("s3://", "s3a://")):
        fs, path = filesystem(url)
        public = os.environ.get(PUBLIC_ENDPOINT_VAR)
        if public:  # a signature covers the host: sign for the address the browser will use
            options = fs.storage_options
            fs = type(fs)(**{**options, "client_kwargs": {**options.get("client_kwargs", {}), "endpoint_url": public}})
        return fs.sign(path, expiration=LINK_EXPIRY, **({"ResponseContentType": content_type} if content_type else {}))
    return None


def link(key: str, url: str, text: str, description: str, content_type: str | None = None) -> bool:
    """A link card to a stored file when a browser can open it (see ``browser_url``); whether one was made."""
    href = browser_url(url, content_type)
    if href:
        create_link_artifact(href, link_text=text, key=artifact_key(key), description=description)
    return href is not None


def data_url(url: str) -> str | None:
    """A PNG as a ``data:`` URL, or None when it is missing or larger than ``MAX_INLINE_IMAGE``."""
    if not exists(url):
        return None
    data = read_bytes(url)
    return f"data:image/png;base64,{base64.b64encode(data).decode()}" if len(data) <= MAX_INLINE_IMAGE else None


def image(key: str, url: str, description: str) -> None:
    """One card for a PNG the run wrote: the picture itself, or (too large to embed) a link or its location."""
    if not exists(url):
        return
    where = to_url(url)
    inline = data_url(url)
    if inline:
        create_image_artifact(inline, key=artifact_key(key, "image"), description=f"{description} ({where})")
    elif not link(key, url, posixpath.basename(where), f"{description} (too large to embed)"):
        markdown(key, f"{description}: `{where}` (too large to embed)", description)


def embed_images(text: str, folder: str) -> str:
    """Markdown whose relative image references (``![alt](name.png)``, under ``folder``) carry the pictures
    themselves; a picture too large to embed is named by its location instead."""
    def embed(m: re.Match) -> str:
        alt, target = m.groups()
        if ":" in target:
            return m.group(0)
        url = join(to_url(folder), target)
        inline = data_url(url)
        return f"![{alt}]({inline})" if inline else f"*{alt}: `{url}` (too large to embed)*"

    return IMAGE_REF.sub(embed, text)


def markdown(key: str, text: str, description: str) -> None:
    create_markdown_artifact(text, key=artifact_key(key), description=description)


@contextmanager
def progress(key: str, description: str, probe: Callable[[], float | None], every: float = 5.0) -> Iterator[None]:
    """A progress artifact updated every ``every`` seconds from ``probe()`` (a fraction, or None) while inside."""
    artifact_id = create_progress_artifact(0.0, key=artifact_key(key, "progress"), description=description)
    stop = threading.Event()
    last = [0.0]

    def poll() -> None:
        while not stop.wait(every):
            try:
                value = probe()
            except Exception:  # noqa: BLE001 - a probe that cannot read yet (file half-written) just waits
                continue
            if value is not None and 100 * value > last[0]:
                last[0] = min(100.0, 100 * value)
                update_progress_artifact(artifact_id, last[0])

    thread = threading.Thread(target=contextvars.copy_context().run, args=(poll,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    update_progress_artifact(artifact_id, 100.0)


# ---------------------------------------------------------------------------------------------------
# A stage's cards
# ---------------------------------------------------------------------------------------------------

def draw(card: Card) -> None:
    """One card a stage declared (``pipelines.report_parts``)."""
    if card.kind == "table":
        table(card.key, card.rows, card.description)
    elif card.kind == "markdown":
        markdown(card.key, card.text, card.description)
    else:
        image(card.key, card.url, card.description)


def experiment_artifacts(summary) -> None:
    markdown("experiment-results", summary.markdown, "ReaLS vs plain VAE: metrics over seeds")
    image("experiment-loss-curves", summary.loss_curves, "loss curves of both arms")


def summary_rows(summary) -> list[dict]:
    """A summary as (field, value) rows, long lists left out."""
    return [{"field": k, "value": v if isinstance(v, str | int | float | bool) or v is None else str(v)}
            for k, v in summary.model_dump().items() if not (isinstance(v, list) and len(v) > 16)]


def loss_curve(stage: str, run_url: str) -> str | None:
    """Plot a training run's log.jsonl to ``loss_curves.png`` in the run folder; its URL, or None."""
    from pipelines.checkpoints import read_log
    from pipelines.render import loss_curves

    png = loss_curves(read_log(join(to_url(run_url), "log.jsonl")), stage)
    if png is None:
        return None
    url = join(to_url(run_url), "loss_curves.png")
    write_bytes_atomic(url, png)
    return url


def publish(record, config, summary) -> None:
    """The cards of a finished stage run: those it declares, or its summary as a table; a training run's loss
    curves."""
    for card in record.cards(summary) if record.cards else [Card("table", record.name, record.help,
                                                                  rows=summary_rows(summary))]:
        draw(card)
    if record.runs_on == "train":
        curve = loss_curve(record.name, config.output)
        if curve:
            image(f"{record.name}-loss-curves", curve, f"{record.name} loss curves")
