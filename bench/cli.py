"""The benchmarks' command lines: bad input in one line, as `python -m cupynet.train` has it.

Every script in bench/ refuses bad input (a bad flag, a GPU that is not there, missing data) in one line on
stderr, `error: ...`, with exit status 2: its parser is cupynet's OneLineErrorParser (a ConfigError instead of a
usage dump), its checks raise CupynetError or call the parser's error, and run_script prints it.

    if __name__ == "__main__":
        run_script(main)
"""
import re
import sys

from cupynet.backends import check_devices, check_dtype
from cupynet.config import DTYPES
from cupynet.errors import CupynetError, DeviceError


def device_of(text):
    return "cpu" if text == "cpu" else int(text)


def run_script(main):
    """A benchmark's `if __name__ == "__main__":`: exit with main()'s status (None: 0); a CupynetError is one
    line, `error: <message>`, and exit status 2, not a traceback."""
    try:
        status = main()
    except CupynetError as error:
        print(f"error: {error}", file=sys.stderr)
        status = 2
    sys.exit(status)


def is_count(text):
    """Digits only ('12'; not str.isdigit(), which takes '²' too)."""
    return re.fullmatch("[0-9]+", text) is not None


def is_device(text):
    """'cpu' or a GPU id (whether that GPU is there is check_device's to say)."""
    return text == "cpu" or is_count(text)


def check_device(text, flag="--device"):
    """Raise a one-line DeviceError unless `text` ('cpu' or a GPU id) is a device this machine has: cupynet's
    check_devices, naming the benchmark's flag. Called by main, not parse_args: parsing never asks the hardware."""
    check_devices([device_of(text)], flag)


def depth_problem(depth, flag="--depth"):
    """A one-line reason `depth` is not a ResNet v1 depth, or None."""
    if depth < 8 or (depth - 2) % 6:
        return f"{flag} must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, ...), got {depth}"
    return None


def dtype_problem(dtype, device=None, flag="--dtype"):
    """A one-line reason cupynet cannot train in `dtype` on `device` ('cpu' or a GPU id; None: on either), or
    None: float32 on either, bfloat16 on a GPU, float64 on the CPU (cupynet.config.DTYPES,
    cupynet.backends.check_dtype)."""
    if dtype not in DTYPES:
        return f"{flag} {dtype!r}: cupynet trains in float32, bfloat16 (GPU) or float64 (CPU)"
    if device is None:
        return None
    try:
        check_dtype(device_of(device), dtype)
    except DeviceError as error:
        return str(error).replace("--dtype", flag, 1)
    return None


def check_at_least(fail, args, minimum, *names):
    """Refuse through fail(message) each of args' numbers `names` (flags' dests) below `minimum` (None: not given)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not value >= minimum:          # NaN too
            fail(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")
