"""Mined RoI pairs: keyset pages, reviews, a score histogram, and exports.

Default order is (score DESC, id ASC), served by the (job_id | image_id |) score DESC, id
indexes; ``order=score_asc`` walks them backwards and ``order=random&seed=`` pages through a
seeded shuffle (a reproducible random sample for review), served by the (job_id, sample key, id)
index (``models.SAMPLE_KEY``: see ``_random_page``). The
``image_id`` filter matches the query side of a pair (each image is a query of its own pairs) by
default; ``side=neighbor`` or ``side=either`` match the other side or both, and
``other_image_id`` keeps the pairs between two images (both directions with ``side=either``).
A ``dataset_id`` filter without ``job_id`` covers every mining job of that dataset; each item
says which job it comes from.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from urllib.parse import quote

import numpy as np
from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import TypeAdapter
from sqlalchemy import BigInteger, Integer, and_, cast, exists, func, literal, literal_column, or_, select, union_all
from sqlalchemy.orm import aliased

from orl.annotation_formats import LABELSTUDIO_CONFIG, CocoSource, coco_json, labelstudio_tasks_json
from services.api import cursors, lookups
from services.api.deps import OptionalId, PairId, SessionDep, WriteAccess, id_query
from services.api.imaging import MAX_RENDER_SIDE_PX
from services.api.schemas import Histogram, Page, PairOut, ReviewIn, ReviewOut
from services.common import reviews
from services.common.correspondences import job_images, job_params_key, mine_job_correspondence, pair_records
from services.common.models import N_AREA, Q_AREA, SAMPLE_KEY, Dataset, Image, Job, PairReview, RoiPair
from services.common.runtime import get_sessionmaker

router = APIRouter(prefix="/api/v1/correspondences", tags=["correspondences"])

MAX_PAGE = 500
MAX_AREA = 1e12  # square pixels; far above any photo
MAX_SEED = 2**62
Side = Literal["query", "neighbor", "either"]
Order = Literal["score_desc", "score_asc", "random"]
QI, NI = aliased(Image, name="qi"), aliased(Image, name="ni")
# The pair's columns a page shows, in the order list_pairs unpacks them.
PAIR_COLUMNS = (RoiPair.id, RoiPair.job_id, RoiPair.image_id, RoiPair.neighbor_image_id, RoiPair.neighbor_rank,
                RoiPair.rank, RoiPair.score, RoiPair.qx1, RoiPair.qy1, RoiPair.qx2, RoiPair.qy2, RoiPair.nx1,
                RoiPair.ny1, RoiPair.nx2, RoiPair.ny2)
PAGE_OF_PAIRS: TypeAdapter[Page[PairOut]] = TypeAdapter(Page[PairOut])


def _filters(session, dataset_id, job_id, min_score=None) -> list:
    where = []
    if job_id is not None:
        where.append(RoiPair.job_id == lookups.mine_job_id(session, job_id))
    if dataset_id is not None:
        if session.execute(select(Dataset.id).where(Dataset.id == dataset_id)).first() is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"dataset {dataset_id} does not exist")
        where.append(RoiPair.job_id.in_(select(Job.id).where(Job.dataset_id == dataset_id)))
    if min_score is not None:
        where.append(RoiPair.score >= min_score)
    return where


def _image_filter(image_id: int | None, side: Side, other_image_id: int | None) -> list:
    """Pairs that have ``image_id`` on ``side`` (query, neighbor or either), and ``other_image_id``
    on the other side when given."""
    if image_id is None:
        if other_image_id is not None or side != "query":
            field = "other_image_id" if other_image_id is not None else "side"
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                                f"query parameter '{field}' qualifies image_id; give image_id too, or drop {field}")
        return []

    def one_way(here, there):
        return and_(here == image_id, there == other_image_id) if other_image_id is not None else here == image_id

    as_query = one_way(RoiPair.image_id, RoiPair.neighbor_image_id)
    as_neighbor = one_way(RoiPair.neighbor_image_id, RoiPair.image_id)
    return [{"query": as_query, "neighbor": as_neighbor, "either": or_(as_query, as_neighbor)}[side]]


def _ranges(min_score, max_score, min_area, max_area) -> list:
    for lo, hi, name in ((min_score, max_score, "score"), (min_area, max_area, "area")):
        if lo is not None and hi is not None and lo > hi:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                                f"query parameter 'min_{name}' ({lo:g}) is above 'max_{name}' ({hi:g}); "
                                "swap them or drop one")
    where = []
    if max_score is not None:
        where.append(RoiPair.score <= max_score)
    # Both boxes of the pair must lie in the area range (pixels of their own images); the
    # expressions of the (job_id, areas) index.
    for area in (Q_AREA, N_AREA):
        if min_area is not None:
            where.append(area >= min_area)
        if max_area is not None:
            where.append(area <= max_area)
    return where


def _reviewed(reviewed: bool | None, reviewer: str | None) -> list:
    if reviewed is None:
        return []
    by = [PairReview.pair_id == RoiPair.id] + ([PairReview.reviewer == reviewer] if reviewer is not None else [])
    done = exists().where(*by)
    return [done if reviewed else ~done]


def _sort_keys(order: Order) -> list[tuple[Any, bool]]:
    """(column, ascending) pairs of a score order; the first is the cursor's sort key, id breaks ties.

    score_asc walks the (..., score DESC, id) indexes backwards, hence id DESC.
    """
    if order == "score_asc":
        return [(RoiPair.score, True), (RoiPair.id, False)]
    return [(RoiPair.score, False), (RoiPair.id, True)]


def _random_page(where: list, seed: int, limit: int, last: list[Any] | None):
    """The ids of one page of the seeded shuffle, with their cursor keys (seg, k): a subquery.

    Every pair has a fixed pseudo-random key, a hash of its id (``SAMPLE_KEY``, unrelated to its
    content), indexed per job. The seed picks a starting point on that circle of keys, the hash of
    the seed; the walk goes up from there (segment 0), then on from the lowest key (segment 1). So
    the first N pairs of a seed are N consecutive keys from a random point: a uniform random
    sample, the same for the same seed, and the next pages go on without repeats. Each segment is
    an index range scan that stops after a page, whatever the job's size (ordering the whole job
    by a per-seed hash, as before, sorted every pair of it for each page).
    """
    start = func.hashint8extended(cast(seed, BigInteger), literal_column("0"), type_=BigInteger)

    def segment(n: int, cond) -> Any:
        extra = [cond]
        if last is not None and last[0] == n:  # the walk is inside this segment: after the last pair sent
            extra.append(or_(SAMPLE_KEY > last[1], and_(SAMPLE_KEY == last[1], RoiPair.id > last[2])))
        return (select(RoiPair.id.label("id"), SAMPLE_KEY.label("k"), literal(n, Integer).label("seg"))
                .where(*where, *extra).order_by(SAMPLE_KEY, RoiPair.id).limit(limit + 1).subquery())

    parts = [segment(1, SAMPLE_KEY < start)]
    if last is None or last[0] == 0:
        parts.insert(0, segment(0, SAMPLE_KEY >= start))
    return union_all(*(select(p.c.id, p.c.k, p.c.seg) for p in parts)).subquery("sample")


def _with_images(stmt):
    """``stmt`` (columns of the pair and of both images) from roi_pairs joined to both images. The
    left side is named: with columns of three tables the select would otherwise have to guess it."""
    return (stmt.select_from(RoiPair).join(QI, QI.id == RoiPair.image_id)
            .join(NI, NI.id == RoiPair.neighbor_image_id))


def _after(keys: list[tuple[Any, bool]], last: list[Any]):
    """Rows after ``last`` in the order of ``keys`` (keyset pagination)."""
    (k1, up1), (k2, up2) = keys
    beyond = (k1 > last[0]) if up1 else (k1 < last[0])
    tie = (k2 > last[1]) if up2 else (k2 < last[1])
    return or_(beyond, and_(k1 == last[0], tie))


@router.get("", response_model=Page[PairOut], summary="RoI pairs: best first, worst first, or a seeded random sample "
                                                      "(keyset pages)", responses=lookups.MINE_JOB_ERRORS)
def list_pairs(
    session: SessionDep,
    dataset_id: OptionalId = None,
    job_id: Annotated[int | None, id_query("a mine job, or a pipeline (its mine stage)")] = None,
    image_id: Annotated[int | None, id_query("pairs with this image on `side`")] = None,
    side: Annotated[Side, Query(description="where image_id is: the query (default), the neighbour, or either "
                                            "(both directions)")] = "query",
    other_image_id: Annotated[int | None, id_query(
        "with image_id: only pairs between the two images")] = None,
    min_score: Annotated[float | None, Query(ge=-1.0, le=1.0)] = None,
    max_score: Annotated[float | None, Query(ge=-1.0, le=1.0)] = None,
    min_area: Annotated[float | None, Query(ge=0, le=MAX_AREA, description=(
        "both boxes at least this large (square pixels of their own image)"))] = None,
    max_area: Annotated[float | None, Query(ge=0, le=MAX_AREA, description="both boxes at most this large")] = None,
    order: Annotated[Order, Query(description=(
        "score_desc (best first), score_asc (worst first), or random (a seeded shuffle: pages of a reproducible "
        "random sample)"))] = "score_desc",
    seed: Annotated[int | None, Query(ge=0, le=MAX_SEED, description="with order=random (default 0)")] = None,
    reviewed: Annotated[bool | None, Query(description=(
        "true: only pairs with a verdict (by ?reviewer= when given); false: only pairs without"))] = None,
    reviewer: Annotated[str | None, Query(min_length=1, max_length=100, description=(
        "adds this reviewer's verdict to each pair, and narrows ?reviewed= to their verdicts"))] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"page size, at most {MAX_PAGE}")] = 50,
    cursor: str | None = None,
) -> Response:
    if seed is not None and order != "random":
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            f"query parameter 'seed' applies to order=random only (got order={order}); drop it")
    where = (_filters(session, dataset_id, job_id, min_score) + _image_filter(image_id, side, other_image_id)
             + _ranges(min_score, max_score, min_area, max_area) + _reviewed(reviewed, reviewer))
    fkey = {"dataset_id": dataset_id, "job_id": job_id, "image_id": image_id, "min_score": min_score,
            "side": side, "other_image_id": other_image_id, "max_score": max_score, "min_area": min_area,
            "max_area": max_area, "order": order, "seed": seed, "reviewed": reviewed, "reviewer": reviewer}
    cols = (*PAIR_COLUMNS, QI.width, QI.height, QI.rel_path, NI.width, NI.height, NI.rel_path)
    if order == "random":
        # cursor: (segment, key, id) of the last pair sent
        last = cursors.decode(cursor, fkey, 3) if cursor else None
        if last is not None and (last[0] not in (0, 1) or not all(isinstance(v, int) and abs(v) < 2**63
                                                                   for v in last)):
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "cursor is not valid; pass the next_cursor of the "
                                                             "previous page unchanged, or omit it")
        sample = _random_page(where, seed or 0, limit, last)
        stmt = (_with_images(select(*cols, sample.c.seg, sample.c.k)).join(sample, sample.c.id == RoiPair.id)
                .order_by(sample.c.seg, sample.c.k, RoiPair.id))
    else:
        keys = _sort_keys(order)  # cursor: (score, id) of the last pair sent
        if cursor:
            where.append(_after(keys, cursors.decode(cursor, fkey, 2)))
        stmt = (_with_images(select(*cols, keys[0][0])).where(*where)
                .order_by(*(k.asc() if up else k.desc() for k, up in keys)))
    # Plain rows of columns, not RoiPair objects: the page is read once, into JSON.
    # On the session's connection: a select of columns needs none of the ORM's execution steps.
    rows = session.connection().execute(stmt.limit(limit + 1)).all()
    page = rows[:limit]
    verdicts = reviews.page_verdicts(session, [r[0] for r in page], reviewer)
    unreviewed = (0, 0, None)
    items = []
    for (pid, job, img, nimg, nrank, rank, score, qx1, qy1, qx2, qy2, nx1, ny1, nx2, ny2,
         qw, qh, qp, nw, nh, np_, *_key) in page:
        yes, no, mine = verdicts.get(pid, unreviewed)
        items.append({"id": pid, "job_id": job, "image_id": img, "neighbor_image_id": nimg, "neighbor_rank": nrank,
                      "rank": rank, "score": score, "query_box": [qx1, qy1, qx2, qy2],
                      "neighbor_box": [nx1, ny1, nx2, ny2], "image_width": qw, "image_height": qh,
                      "neighbor_width": nw, "neighbor_height": nh, "image_path": qp, "neighbor_path": np_,
                      "reviews": {"correct": yes, "wrong": no}, "verdict": mine})
    nxt = None
    if len(rows) > limit:
        last = rows[limit - 1]
        nxt = cursors.encode([*last[len(cols):], last[0]], fkey)
    # The page is validated against the response model and serialised here, in one pass (the
    # schema's own validator and serialiser, in Rust), and sent as it is; returning the model
    # would have FastAPI validate it again, in another round trip through the thread pool.
    page_out = PAGE_OF_PAIRS.validate_python({"items": items, "next_cursor": nxt})
    return Response(PAGE_OF_PAIRS.dump_json(page_out), media_type="application/json")


@router.put("/{pair_id}/review", response_model=ReviewOut, dependencies=[WriteAccess],
            summary="Mark a pair correct or wrong (one verdict per reviewer: a second PUT replaces the first)",
            responses={200: {"description": "this reviewer's earlier verdict was replaced"},
                       201: {"description": "the first verdict of this reviewer on the pair"},
                       404: {"description": "no such pair"}})
def review_pair(pair_id: PairId, body: ReviewIn, session: SessionDep, response: Response) -> ReviewOut:
    if session.get(RoiPair, pair_id) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND,
                            f"pair {pair_id} does not exist; pair ids are the 'id' of GET /api/v1/correspondences")
    saved = reviews.put_review(session, pair_id, body.reviewer, body.verdict)
    session.commit()
    response.status_code = status.HTTP_201_CREATED if saved.created else status.HTTP_200_OK
    return ReviewOut.model_validate(saved.review)


@router.get("/histogram", response_model=Histogram, summary="Histogram of pair scores",
            responses=lookups.MINE_JOB_ERRORS)
def histogram(
    session: SessionDep,
    dataset_id: OptionalId = None,
    job_id: OptionalId = None,
    bins: Annotated[int, Query(ge=1, le=200)] = 20,
) -> Histogram:
    where = _filters(session, dataset_id, job_id)
    lo, hi, total = session.execute(select(func.min(RoiPair.score), func.max(RoiPair.score), func.count())
                                    .where(*where)).one()
    if not total:
        return Histogram(edges=[], counts=[], total=0)
    if hi <= lo:
        return Histogram(edges=[lo, hi], counts=[total], total=total)
    # width_bucket puts the maximum itself in bucket bins+1; fold it into the last bin.
    b = func.least(func.width_bucket(RoiPair.score, lo, hi, bins), bins)
    counts = dict(session.execute(select(b, func.count()).where(*where).group_by(b)).all())
    edges = np.linspace(lo, hi, bins + 1).tolist()
    return Histogram(edges=edges, counts=[int(counts.get(i, 0)) for i in range(1, bins + 1)], total=total)


# -- export -------------------------------------------------------------------------------------
CSV_COLUMNS = ["pair_id", "job_id", "image_id", "image_path", "image_width", "image_height", "neighbor_image_id",
               "neighbor_path", "neighbor_width", "neighbor_height", "neighbor_rank", "rank", "score",
               "qx1", "qy1", "qx2", "qy2", "nx1", "ny1", "nx2", "ny2"]


def _csv_rows(mine_id: int) -> Iterator[str]:
    return _stream(lambda session: _csv_lines(session, mine_id))


def _csv_lines(session, mine_id: int) -> Iterator[str]:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_COLUMNS)
    stmt = (select(RoiPair, QI.rel_path, QI.width, QI.height, NI.rel_path, NI.width, NI.height)
            .join(QI, QI.id == RoiPair.image_id).join(NI, NI.id == RoiPair.neighbor_image_id)
            .where(RoiPair.job_id == mine_id)
            .order_by(RoiPair.image_id, RoiPair.neighbor_rank, RoiPair.rank)
            .execution_options(yield_per=5000))  # stream: never the whole table in memory
    for p, qp, qw, qh, np_, nw, nh in session.execute(stmt):
        w.writerow([p.id, p.job_id, p.image_id, qp, qw, qh, p.neighbor_image_id, np_, nw, nh, p.neighbor_rank,
                    p.rank, repr(p.score), p.qx1, p.qy1, p.qx2, p.qy2, p.nx1, p.ny1, p.nx2, p.ny2])
        if buf.tell() > 1 << 16:
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
    yield buf.getvalue()


EXPORT_FORMATS = ("orl-json", "csv", "labelstudio", "coco")
ExportFormat = Literal["orl-json", "csv", "labelstudio", "coco"]


def _stream(chunks_of) -> Iterator[str]:
    """The chunks ``chunks_of(session)`` yields, with a session of its own: the response body is
    produced after the endpoint (and its request-scoped session) returned."""
    with get_sessionmaker()() as session:
        yield from chunks_of(session)


def _attachment(name: str) -> dict[str, str]:
    return {"Content-Disposition": f'attachment; filename="{name}"'}


def _image_url(base_url: str, prefix: str | None):
    """Where a Label Studio user's browser finds an image: ``prefix`` + its path under the dataset
    folder (e.g. Label Studio's local files), or else this API's largest thumbnail, by absolute URL."""
    if prefix is not None:
        return lambda img: prefix + quote(img.file)
    return lambda img: f"{base_url}api/v1/images/{img.image_id}/thumbnail?size={MAX_RENDER_SIDE_PX}"


@router.get("/export", summary="All pairs of a mining job: official ORL json, flat CSV, Label Studio tasks or COCO",
            responses={200: {"content": {"application/json": {}, "text/csv": {}}}, **lookups.MINE_JOB_ERRORS})
def export(
    session: SessionDep,
    request: Request,
    job_id: Annotated[int, id_query("a mine job, or a pipeline (its mine stage)")],
    format: Annotated[ExportFormat, Query(description=(
        "orl-json (the authors' layout), csv (one row per pair), labelstudio (one task per pair, both images; "
        "labeling config: GET /api/v1/correspondences/labelstudio-config), coco (detections per image plus a "
        "'pairs' list; FiftyOne's COCODetectionDataset loads it)"))] = "orl-json",
    image_url_prefix: Annotated[str | None, Query(min_length=1, max_length=2000, description=(
        "labelstudio only: image URL = this + the image's path under the dataset folder, e.g. "
        "'/data/local-files/?d=' for Label Studio's local files; default: this API's thumbnails"))] = None,
):
    if image_url_prefix is not None and format != "labelstudio":
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            f"query parameter 'image_url_prefix' applies to format=labelstudio only (got "
                            f"format={format}); drop it")
    mine_id = lookups.mine_job_id(session, job_id)
    job = session.get(Job, mine_id)
    if format == "csv":
        return StreamingResponse(_csv_rows(mine_id), media_type="text/csv",
                                 headers=_attachment(f"pairs_job{mine_id}.csv"))
    if format == "labelstudio":
        url = _image_url(str(request.base_url), image_url_prefix)
        return StreamingResponse(
            _stream(lambda s: labelstudio_tasks_json(pair_records(s, mine_id), url, f"orl-mine-job-{mine_id}")),
            media_type="application/json", headers=_attachment(f"pairs_job{mine_id}.labelstudio.json"))
    if format == "coco":
        ds = session.get(Dataset, job.dataset_id)
        info = {"description": f"ORL pairs mined by job {mine_id}: two boxes per pair, linked in 'pairs'",
                "job_id": mine_id, "dataset_id": job.dataset_id, "images_root": ds.path if ds else None,
                "params_key": job_params_key(job), "date_created": datetime.now(UTC).isoformat()}
        return StreamingResponse(
            _stream(lambda s: coco_json(CocoSource(images=lambda: job_images(s, mine_id),
                                                   records=lambda: pair_records(s, mine_id), info=info))),
            media_type="application/json", headers=_attachment(f"pairs_job{mine_id}.coco.json"))
    corr = mine_job_correspondence(session, job)  # = the miner's correspondence.json
    return JSONResponse(corr.to_official(), headers=_attachment(f"correspondence_job{mine_id}.json"))


@router.get("/labelstudio-config", response_class=Response, summary="The Label Studio labeling config of "
            "format=labelstudio exports (paste it into the project's Labeling Interface)",
            responses={200: {"content": {"application/xml": {}}}})
def labelstudio_config() -> Response:
    return Response(LABELSTUDIO_CONFIG, media_type="application/xml",
                    headers=_attachment("orl_pairs_labelstudio_config.xml"))
