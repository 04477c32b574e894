"""OpenAI's graders: the shapes, template rendering, similarity metrics, the multi grader's formula and the
sandboxed python grader. Neither web nor torch nor the database: the API's graders routes use it, and so can
the training child (its import rule allows this package), so a reward is computed by one piece of code."""
