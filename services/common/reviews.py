"""Reviews of mined pairs: a person marks a pair correct or wrong; per mining job, the share
marked correct is its reviewed precision, with a Wilson interval.

One row per (pair, reviewer) (``pair_reviews``): a reviewer's next verdict on the same pair
replaces the first, so a retried or repeated request never counts twice. When several people
reviewed one pair, the pair counts once, with the verdict most of them gave; a tie is
``disputed`` and left out of the precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import BigInteger, String, any_, bindparam, case, func, literal_column, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from orl.metrics import wilson_interval
from services.common.models import PairReview, RoiPair

LEVEL = 0.95


@dataclass(frozen=True)
class Saved:
    review: PairReview
    created: bool  # False: this reviewer's earlier verdict on the pair was replaced


def put_review(session: Session, pair_id: int, reviewer: str, verdict: str) -> Saved:
    """Record ``reviewer``'s ``verdict`` on a pair (insert, or update their earlier one). Does not commit."""
    table = PairReview.__table__
    stmt = pg_insert(table).values(pair_id=pair_id, reviewer=reviewer, verdict=verdict)
    stmt = stmt.on_conflict_do_update(index_elements=[table.c.pair_id, table.c.reviewer],
                                      set_={"verdict": stmt.excluded.verdict, "updated_at": func.now()})
    # xmax is 0 on a freshly inserted row version, the updating transaction's id otherwise.
    row = session.execute(stmt.returning(table.c.id, literal_column("xmax = 0").label("created"))).one()
    review = session.execute(select(PairReview).where(PairReview.id == row.id)
                             .execution_options(populate_existing=True)).scalar_one()
    return Saved(review, bool(row.created))


@dataclass(frozen=True)
class Summary:
    reviewed: int  # pairs with at least one verdict
    correct: int  # pairs most of whose reviewers said correct
    wrong: int
    disputed: int  # as many correct as wrong verdicts: in neither count
    reviews: int  # verdicts given
    reviewers: list[str]
    last_review_at: datetime | None

    @property
    def precision(self) -> float | None:
        judged = self.correct + self.wrong
        return self.correct / judged if judged else None

    @property
    def interval(self) -> tuple[float, float] | None:
        return wilson_interval(self.correct, self.correct + self.wrong, LEVEL)


def job_summary(session: Session, job_id: int, reviewer: str | None = None) -> Summary:
    """The reviews of a mining job's pairs (only ``reviewer``'s when given)."""
    where = [RoiPair.job_id == job_id]
    if reviewer is not None:
        where.append(PairReview.reviewer == reviewer)
    yes = func.sum(case((PairReview.verdict == "correct", 1), else_=0)).label("yes")
    no = func.sum(case((PairReview.verdict == "wrong", 1), else_=0)).label("no")
    per_pair = (select(PairReview.pair_id, yes, no).join(RoiPair, RoiPair.id == PairReview.pair_id)
                .where(*where).group_by(PairReview.pair_id).subquery())
    reviewed, correct, wrong, disputed, reviews = session.execute(select(
        func.count(), func.count().filter(per_pair.c.yes > per_pair.c.no),
        func.count().filter(per_pair.c.no > per_pair.c.yes), func.count().filter(per_pair.c.yes == per_pair.c.no),
        func.coalesce(func.sum(per_pair.c.yes + per_pair.c.no), 0))).one()
    who = session.execute(select(PairReview.reviewer, func.max(PairReview.updated_at))
                          .join(RoiPair, RoiPair.id == PairReview.pair_id).where(*where)
                          .group_by(PairReview.reviewer).order_by(PairReview.reviewer)).all()
    return Summary(reviewed=int(reviewed), correct=int(correct), wrong=int(wrong), disputed=int(disputed),
                   reviews=int(reviews), reviewers=[r for r, _ in who],
                   last_review_at=max((t for _, t in who), default=None))


# One statement for every page (the ids are one array parameter): its SQL does not change with
# the page's length, so SQLAlchemy compiles it once and Postgres prepares it once.
_PAGE_VERDICTS = (
    select(PairReview.pair_id,
           func.count().filter(PairReview.verdict == "correct"),
           func.count().filter(PairReview.verdict == "wrong"),
           func.max(PairReview.verdict).filter(PairReview.reviewer == bindparam("reviewer", type_=String)))
    .where(PairReview.pair_id == any_(bindparam("ids", type_=ARRAY(BigInteger))))
    .group_by(PairReview.pair_id))


def page_verdicts(session: Session, pair_ids: list[int], reviewer: str | None = None
                  ) -> dict[int, tuple[int, int, str | None]]:
    """pair id -> (correct, wrong, ``reviewer``'s verdict or None) for the pairs of one page that
    have a verdict (absent: not reviewed)."""
    if not pair_ids:
        return {}
    rows = session.connection().execute(_PAGE_VERDICTS, {"ids": pair_ids, "reviewer": reviewer})
    return {pid: (yes, no, mine) for pid, yes, no, mine in rows}


def consensus(correct: int, wrong: int) -> str | None:
    """A pair's verdict from its reviewers' counts, by the rule of ``job_summary``: the majority,
    ``disputed`` on a tie, None when nobody reviewed it."""
    if correct == wrong:
        return "disputed" if correct else None
    return "correct" if correct > wrong else "wrong"


def reviews_of(session: Session, pair_ids: list[int]) -> dict[int, list[tuple[str, str, datetime]]]:
    """pair id -> [(reviewer, verdict, updated_at)], by reviewer name, for the given pairs (absent: not reviewed)."""
    out: dict[int, list[tuple[str, str, datetime]]] = {}
    if pair_ids:
        for pid, who, verdict, at in session.execute(
                select(PairReview.pair_id, PairReview.reviewer, PairReview.verdict, PairReview.updated_at)
                .where(PairReview.pair_id.in_(pair_ids)).order_by(PairReview.pair_id, PairReview.reviewer)):
            out.setdefault(int(pid), []).append((who, verdict, at))
    return out
