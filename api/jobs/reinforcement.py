"""What a reinforcement job's grader must pass at create: everything the graders API checks (templates,
formula, python source, judge models the organisation can call), and the item fields its templates name
present in the job's files (their first rows here; every row when the job validates its files)."""

from sqlalchemy.orm import Session

from api.graders import service as graders
from api.jobs.schemas import ReinforcementMethod
from graders.grading import item_fields
from models.errors import APIError
from models.orm import File
from models.storage import ArtifactStore
from models.validation import first_missing_field

PARAM = "method.reinforcement.grader"
CHECKED_ROWS = 1000
"""Rows of each file checked at create, so a mistyped field is a 400 at once without reading a whole
large file in the request; the job checks every row."""


def check_grader(
    session: Session, store: ArtifactStore, org: str, method: ReinforcementMethod, files: dict[str, File]
) -> None:
    """A 400 naming the grader's field, or the file's line and field, for a grader this job cannot use."""
    graders.validate(session, store, org, method.grader, PARAM)
    fields = item_fields(method.grader, PARAM)
    for param, record in files.items():
        with store.open(record.storage_key) as stream:
            missing = first_missing_field(stream, list(fields), CHECKED_ROWS)
        if missing is not None:
            line_no, field = missing
            raise APIError(
                f"Line {line_no} of the {param.replace('_', ' ')} has no field `{field}`, which the grader "
                f"names as {{{{item.{field}}}}}.",
                param=fields[field],
            )
