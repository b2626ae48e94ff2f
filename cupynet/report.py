"""What a run shows: the periodic progress line, the final report, metrics.jsonl, and how a command ends
(exit_status: its status, and one line on stderr for each way it can fail).

    log = MetricsLog(model_dir)               # appends one JSON object per line to metrics.jsonl
    log.write("train", step=100, loss=2.01)
    print(progress_line(step=100, total=2000, epoch=0.28, loss=2.01, lr=0.1, images_per_sec=95.0, eta_s=610))
"""
import json
import math
import os
import sys
import time

from cupynet.errors import CheckpointError, CupynetError


def format_duration(seconds):
    """1h02m, 5m12s or 42s."""
    seconds = int(round(max(seconds, 0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def progress_line(step, total, epoch, loss, lr, images_per_sec, eta_s):
    width = len(str(total))
    return (f"step {step:>{width}}/{total}  epoch {epoch:6.2f}  loss {loss:.4f}  lr {lr:g}  "
            f"{images_per_sec:,.0f} img/s  ETA {format_duration(eta_s)}")


class MetricsLog:
    """Appends events to <model_dir>/metrics.jsonl, one complete JSON object per write."""

    def __init__(self, model_dir):
        self.path = os.path.join(model_dir, "metrics.jsonl")

    def write(self, event, **fields):
        record = {"event": event, "time": round(time.time(), 3), **fields}
        line = json.dumps(_strict_json(record), allow_nan=False) + "\n"
        # One os.write of one line in append mode: a killed run leaves whole lines, never a torn one
        # in the middle of the file.
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        except OSError as error:      # the model dir removed, or full, during the run: one line, as at its start
            raise CheckpointError(f"cannot write {self.path}: {error.strerror or error}") from None


def _strict_json(value):
    """`value` with every float that is not finite (a diverged run's loss) as None: metrics.jsonl stays standard
    JSON, which has no NaN or Infinity (Python would write them, and jq, say, refuses them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(item) for item in value]
    return value


def read_metrics(model_dir):
    """Every event of <model_dir>/metrics.jsonl, in order, as dicts."""
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def exit_status(program, resumable=False):
    """Run a command's `program()` (its exit status, None: 0) the way every cupynet command ends: bad input
    (CupynetError) or an output that cannot be written is one line `error: ...` and status 2; a closed output
    pipe (`... | head`) 141 and Ctrl-C 130, as a shell's commands end, each with one line (a `resumable` run's
    says its checkpoints are intact); never a traceback. Output is flushed at every line."""
    kept = "the last complete checkpoint is intact"
    _print_each_line_at_once()
    try:
        status = program()
        _flush_stdout()            # a closed output pipe is found here, not by the interpreter's exit
        return status or 0
    except CupynetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:        # the output's reader went away: stop as a pipe's writer does
        _leave_stdout_quietly()
        print(f"stopped: the output pipe was closed{'; ' + kept if resumable else ''}", file=sys.stderr)
        return 141
    except OSError as error:       # the output cannot be written (a full disk): one line, as for bad input
        _leave_stdout_quietly()
        print(f"error: cannot write the output: {error.strerror or error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = f": {kept}; rerun the same command to resume" if resumable else ""
        print(f"\ninterrupted{resume}", file=sys.stderr)
        return 130


def _print_each_line_at_once():
    """Standard output flushed at every line, a pipe included: `... | tee run.log` shows each progress line as it
    is printed, and `... | head` stops the run at its next line, not once 8 KB of lines have piled up."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)


def _leave_stdout_quietly():
    """After standard output failed (`... | head` closed it, or it is a full disk): point it at /dev/null, so that
    the interpreter's last flush at exit cannot fail again with a traceback."""
    if sys.stdout is not None:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _flush_stdout():
    """Flush standard output, which may be closed (`>&-`: sys.stdout is None, and print() writes nothing)."""
    if sys.stdout is not None:
        sys.stdout.flush()
