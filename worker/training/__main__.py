"""`python -m worker.training --spec SPEC.json --events-fd N`: run one training job as a child process.

Events go to fd N as JSON lines (or, for a rank started by `worker.training.launch`, to `--events-path`;
only rank 0 writes); library logs and tracebacks go to stderr. Exit 0 on success or on an honoured stop
file, 1 after reporting an error event.
"""

import argparse
import sys
import traceback
from pathlib import Path

from models.spec import DataError, LogMessage, TrainingSpec
from worker.child import die_with_parent
from worker.training import distributed
from worker.training.events import EventWriter
from worker.training.quiet import hide_known_library_noise, skip_bitsandbytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.training", description=__doc__)
    parser.add_argument("--spec", type=Path, required=True, help="TrainingSpec JSON file")
    events_to = parser.add_mutually_exclusive_group(required=True)
    events_to.add_argument("--events-fd", type=int, help="inherited file descriptor for events")
    events_to.add_argument("--events-path", help="a path to open for events (ranks of a launched job)")
    args = parser.parse_args(argv)

    if distributed.world_size() > 1:
        # The launcher starts ranks in sessions of their own: without this they would outlive it.
        die_with_parent()
    target = args.events_fd if args.events_path is None else args.events_path
    events = EventWriter(target if distributed.is_main() else None)
    try:
        spec = TrainingSpec.model_validate_json(args.spec.read_text(encoding="utf-8"))
        if not distributed.is_main():
            spec = spec.model_copy(update={"trackers": []})  # one tracker run per job, rank 0's
        hide_known_library_noise()
        if spec.hyperparameters.training_type != "qlora":
            skip_bitsandbytes()
        # Imported only now: they load peft, which would load bitsandbytes before the line above.
        from worker.training import feature_extraction, recipe
        from worker.training.trackers import Trackers

        distributed.start()
        with Trackers(spec, events):
            # Feature extraction fits a classifier head in one solve: no steps for the recipe's loop.
            if spec.hyperparameters.training_type == "feature_extraction":
                feature_extraction.run(spec, events)
            else:
                recipe.run(spec, events)
    except DataError as exc:  # the file, not the trainer: the job fails with the data's own error code
        events.emit(LogMessage(level="error", message=exc.message, code=exc.code, param=exc.param))
        return 1
    except Exception as exc:
        traceback.print_exc()
        # One line: the runner shows it to the user as the job's error.
        events.emit(LogMessage(level="error", message=f"{type(exc).__name__}: {' '.join(str(exc).split())}"))
        return 1
    finally:
        distributed.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
