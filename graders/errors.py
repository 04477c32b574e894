class GraderError(ValueError):
    """A grader that cannot be used as given; `param` is the offending field's path (`grader.input`)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message, self.param = message, param
