"""User mistakes: argument checks that say what is allowed, and the one `error: ...` line a command prints for them.

The command lines run their work through `report_mistakes`: a user's mistake (FileNotFoundError, KeyError,
ValueError, which ConfigError and CheckpointMismatch are, or gin's TypeError for a configurable called without a
required argument) becomes one line on stderr and exit status 2, without a traceback; so does a folder the command
cannot use (read-only, not a folder, no permission: exit status 2) or a full disk (exit status 1). Anything else is a
bug and propagates with its traceback. A command whose work survives Ctrl-C (sample.py, the encoders) says so
in one line and exits with EXIT_INTERRUPTED.

Under `sprint_mm.launch` every process of a command meets the same mistake: each hands its line to the launcher
(`final_line`), which prints each distinct line once.
"""
from __future__ import annotations

import ast
import errno
import os
import re
import sys
from numbers import Real
from pathlib import Path
from typing import Any, Callable, Optional

USER_ERRORS = (FileNotFoundError, KeyError, ValueError)
# What an OSError says about the machine rather than the program: the advice for each, and the exit status.
FOLDER_PROBLEMS = {
    errno.EACCES: "no permission: choose a folder you may write, or fix its permissions",
    errno.EPERM: "no permission: choose a folder you may write, or fix its permissions",
    errno.EROFS: "the file system is read-only: choose a writable folder",
    errno.ENOTDIR: "a path that must be a folder is a file",
    errno.EISDIR: "a path that must be a file is a folder",
    errno.EEXIST: "a file is in the way",
    errno.ENAMETOOLONG: "the path is too long",
    errno.ELOOP: "the path has a loop of symbolic links",
}
DISK_PROBLEMS = {
    errno.ENOSPC: "the disk is full: free space or choose another folder",
    errno.EDQUOT: "the disk quota is used up: free space or choose another folder",
    errno.EFBIG: "the file is larger than this process may write (ulimit -f)",
}
# The launcher's folder for the processes' final lines (sprint_mm.launch sets it).
LAUNCH_REPORTS = "SPRINT_MM_LAUNCH_REPORTS"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C
# gin re-raises an error of a configurable with this line appended, once per configurable on the call stack
GIN_CALL = re.compile(r"\n\s*In call to configurable '([^']+)'[^\n]*")
# ... and, for a TypeError of a call that lacks required arguments, with these lines before it
GIN_UNBOUND = re.compile(r"\n\s*No values supplied by Gin or caller for arguments: (\[[^\]]*\])")


def check_number(name: str, value: Any, low: Optional[float] = None, high: Optional[float] = None, *,
                 integer: bool = False, below_high: bool = False) -> None:
    """Raise a ValueError naming `name`, its value and what is allowed unless `value` is a number (an int with
    `integer`; a bool is neither) in [low, high], or [low, high) with `below_high`; a bound of None is no bound."""
    fits = (not isinstance(value, bool) and isinstance(value, int if integer else Real)
            and (low is None or value >= low)
            and (high is None or (value < high if below_high else value <= high)))
    if fits:
        return
    if low is not None and high is not None:
        allowed = f" in [{low:g}, {high:g}{')' if below_high else ']'}"
    elif low is not None:
        allowed = f" >= {low:g}"
    elif high is not None:
        allowed = f" {'<' if below_high else '<='} {high:g}"
    else:
        allowed = ""
    raise ValueError(f"{name} must be {'an integer' if integer else 'a number'}{allowed}, got {value!r}")


def mistake_message(err: BaseException) -> Optional[str]:
    """The one-line message of a user's mistake, or None when `err` is a bug.

    gin's call lines become "(in NAME)" for the innermost configurable unless the message names it (as a word); a
    KeyError's message loses the quotes that str() adds; the lines of a multi-line report are joined.
    """
    text = str(err)
    called = GIN_CALL.findall(text)
    if isinstance(err, TypeError):
        unbound = GIN_UNBOUND.search(text)
        names = [] if unbound is None else [name for name in ast.literal_eval(unbound.group(1)) if name != "self"]
        if not names or not called:
            return None
        return f"{called[0]} has no value for {', '.join(names)}: bind " + ", ".join(f"`{called[0]}.{name} = ...`"
                                                                                 for name in names)
    if not isinstance(err, USER_ERRORS):
        return None
    text = GIN_CALL.sub("", text).strip()
    if isinstance(err, KeyError) and len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        text = str(ast.literal_eval(text))
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [type(err).__name__]
    message = lines[0]
    for line in lines[1:]:
        message += (" " if message.endswith(":") else "; ") + line
    if called and not re.search(rf"\b{re.escape(called[0])}\b", message, re.IGNORECASE):
        message += f" (in {called[0]})"
    return message


def check_writable_folder(folder: Path, what: str) -> None:
    """Create `folder` or find it, refusing a file in its place and a folder this process cannot write (with the
    OSError a write would meet, naming the folder), before any work that would end by writing there."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{what} {str(folder)!r} is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK | os.X_OK):
        code = errno.EROFS if os.statvfs(folder).f_flag & os.ST_RDONLY else errno.EACCES
        raise OSError(code, os.strerror(code), str(folder))


def os_error_message(err: OSError) -> Optional[str]:
    """One line for an OSError about a folder or a disk (the path, what the system said, what to do), or None."""
    advice = FOLDER_PROBLEMS.get(err.errno) or DISK_PROBLEMS.get(err.errno)
    if advice is None:
        return None
    paths = " -> ".join(str(name) for name in (err.filename, err.filename2) if name is not None)
    return f"{paths + ': ' if paths else ''}{err.strerror or os.strerror(err.errno)} ({advice})"


def final_line(line: str) -> None:
    """The line a command ends with (an error, a stop): on stderr, or to the launcher that started this process."""
    folder = os.environ.get(LAUNCH_REPORTS)
    if folder and Path(folder).is_dir():
        with open(Path(folder) / f"rank{os.environ.get('RANK', '0')}.txt", "a") as file:
            file.write(line.replace("\n", " ") + "\n")
    else:
        print(line, file=sys.stderr)


def report_mistakes(work: Callable[..., object], *args: Any, interrupted: Optional[str] = None) -> int:
    """Run `work(*args)`: 0 when it succeeds, 2 with one `error: ...` line on stderr for a user's mistake or a folder
    it cannot use, 1 with one line for a full disk. With `interrupted` (what Ctrl-C leaves, e.g. "the samples written
    so far are kept"), Ctrl-C gives that one line and EXIT_INTERRUPTED instead of a KeyboardInterrupt traceback."""
    try:
        work(*args)
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        final_line(f"interrupted: {interrupted}")
        return EXIT_INTERRUPTED
    except (*USER_ERRORS, TypeError, OSError) as err:
        message = mistake_message(err)
        if message is None and isinstance(err, OSError):
            message = os_error_message(err)
        if message is None:
            raise
        final_line(f"error: {message}")
        return 1 if isinstance(err, OSError) and err.errno in DISK_PROBLEMS else 2
    return 0
