"""How every command ends: exit codes, refused input, the one-line report.

Exit codes (the same for every `python -m optconsist_jax.<command>`):

  0   OK          finished.
  2   USER        refused input: a flag, a config key or value, a data file
                  that is missing or has a malformed record, a workdir that
                  holds another run. Nothing was written. Fix and rerun.
  3   NONFINITE   training stopped at a NaN/Inf loss or gradient norm;
                  nothing was saved from the bad state.
  74  SAVE_FAILED a checkpoint could not be written (disk full, permissions);
                  training stopped at once. `EX_IOERR` of BSD sysexits.h
                  ("an error occurred while doing I/O on some file").
  75  PREEMPTED   stopped by SIGTERM after saving a complete checkpoint;
                  rerun the same command to resume. `EX_TEMPFAIL` of BSD
                  sysexits.h ("a temporary failure ... the user is invited to
                  retry"), the code schedulers and the launcher's supervisor
                  (tools/launch/supervise.py) treat as "start me again".

Anything else (1, or a signal) is a bug or a crash and keeps its traceback.

A command's `main` runs under `run`, which turns a `CommandError` into one
line on stderr (`ERROR: <what is wrong>. <what to do>`) and its exit code.
The traceback is printed only with `--verbose` (any command) or absl's
`-v 1`. Code reading user input wraps it in `user_input()`, so the
ValueError / FileNotFoundError / KeyError raised by config conversion and the
data readers (which name the file, record and key) become `UserError`s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import ast
import contextlib
import os
import re
import sys
import traceback
from typing import Any, NoReturn

OK = 0
USER = 2
NONFINITE = 3
SAVE_FAILED = 74
PREEMPTED = 75

VERBOSE_FLAG = "--verbose"


class CommandError(Exception):
  """An expected way for a command to fail; `exit_code` says which."""

  exit_code = 1


class UserError(CommandError, ValueError):
  """Input the command refuses (what is wrong, and what to do)."""

  exit_code = USER


class Preempted(CommandError):
  """Stopped on SIGTERM after saving; the same command resumes."""

  exit_code = PREEMPTED


def one_line(text: str) -> str:
  """A message on one line: its lines joined by '; '."""
  parts = [p.strip() for p in str(text).splitlines()]
  return "; ".join(p for p in parts if p)


def _message(e: BaseException) -> str:
  text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
  # str(KeyError) is the repr of its message, and ml_collections wraps that
  # again in an AttributeError: undo the quoting ('\\'x\\'\\nDid you ...').
  for _ in range(3):
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
      try:
        text = str(ast.literal_eval(text))
        continue
      except (ValueError, SyntaxError):
        pass
    break
  return text


@contextlib.contextmanager
def user_input(where: str = "") -> Iterator[None]:
  """Errors raised while reading user input become `UserError`s."""
  try:
    yield
  except CommandError:
    raise
  except (ValueError, FileNotFoundError, KeyError, NotADirectoryError,
          IsADirectoryError) as e:
    msg = one_line(_message(e))
    raise UserError(f"{where}: {msg}" if where else msg) from e


def short_cause(e: BaseException, limit: int = 300) -> str:
  """The innermost cause of an exception, on one line, at most `limit` chars.

  Orbax / TensorStore errors carry the whole array spec (tens of lines of
  JSON); the cause a person needs is the innermost exception's first line
  or the part after the last "[source locations]"/spec dump.
  """
  inner = e
  seen = set()
  while id(inner) not in seen:
    seen.add(id(inner))
    nxt = inner.__cause__ or inner.__context__
    if nxt is None:
      break
    inner = nxt
  text = _message(inner).strip() or type(inner).__name__
  first = text.splitlines()[0] if text else ""
  # TensorStore: 'Error opening "zarr" driver: Error reading local file
  # "/.../x": <reason> [source locations=...] [tensorstore_spec=...]'.
  for marker in (" [source locations=", " [tensorstore_spec=", " {\""):
    if marker in first:
      first = first[:first.index(marker)]
  first = re.sub(r"\s*\[[a-z_]+='[^']*'\]", "", first).strip()
  out = f"{type(inner).__name__}: {first}"
  if len(out) <= limit:
    return out
  # Keep the beginning (what failed) and the end (why: "No space left...").
  reason = out.rsplit(": ", 1)[-1][-(limit // 2):]
  return out[:limit - len(reason) - 5] + " ... " + reason


def _verbose() -> bool:
  if os.environ.get("OPTCONSIST_VERBOSE"):
    return True
  try:
    # deferred: absl where flags exist; errors stays stdlib-only (launcher).
    from absl import flags  # pylint: disable=g-import-not-at-top
    f = flags.FLAGS
    return f.is_parsed() and "verbosity" in f and f.verbosity >= 1
  except ImportError:
    return False


def report(e: BaseException, code: int) -> NoReturn:
  """Prints one line for `e` (traceback when verbose) and exits `code`."""
  if _verbose():
    traceback.print_exception(e, file=sys.stderr)
  sys.stderr.write(f"ERROR: {one_line(_message(e))}\n")
  sys.stderr.flush()
  sys.exit(code)


def _strip_verbose(argv: list[str]) -> list[str]:
  if VERBOSE_FLAG in argv:
    os.environ["OPTCONSIST_VERBOSE"] = "1"
    argv = [a for a in argv if a != VERBOSE_FLAG]
  return argv


def guard(main: Callable[..., Any]) -> Callable[..., Any]:
  """`main` with CommandErrors turned into one line and their exit code."""

  def wrapped(*args, **kwargs):
    try:
      rc = main(*args, **kwargs)
    except CommandError as e:
      report(e, e.exit_code)
    return rc
  wrapped.__name__ = getattr(main, "__name__", "main")
  wrapped.__doc__ = main.__doc__
  return wrapped


def parse_absl_flags(argv: Sequence[str]) -> list[str]:
  """absl flag parsing with one-line errors (a bad flag, config file or key).

  `--config.x.y=...` naming a key the config lacks, and a config file whose
  `get_config(arg)` raises (e.g. `configs/tiny_metamath.py:adam`), are
  refused with the flag and the reason; ml_collections' "Did you mean" hint
  is kept.
  """
  # deferred: absl where flags exist; errors stays stdlib-only (launcher).
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    return flags.FLAGS(list(argv))
  except (AttributeError, KeyError) as e:
    lines = [x.strip() for x in _message(e).splitlines() if x.strip()]
    quoted = lines[0] if lines else "?"
    hint = " ".join(lines[1:]) or "See the config file for the valid keys."
    key = quoted.strip("'\"")
    bad = [a for a in argv[1:] if a.startswith("--config.")
           and key and key in a.split("=")[0]] or [
               a for a in argv[1:] if a.startswith("--config.")]
    err = UserError(
        f"{', '.join(bad) or 'a --config override'}: the config has no key"
        f" {key!r}. {hint}")
    err.__cause__ = e
    report(err, USER)
  except flags.Error as e:
    text = str(e)
    if "Traceback (most recent call last)" in text:
      # A config file that raised: keep the flag and the exception line.
      head = text.splitlines()[0].split(": Error whilst parsing")[0]
      last = [line for line in text.splitlines() if line.strip()][-1]
      text = f"{head.removeprefix('flag ')}: {last.strip()}"
    err = UserError(text)
    err.__cause__ = e  # With --verbose: the config file's traceback.
    report(err, USER)


def run(main: Callable[..., Any], *, absl: bool = True) -> NoReturn:
  """Runs a command's main under `guard`, absl-style or `main(argv)`.

  Args:
    main: the command's main; absl mains take argv, argparse mains take
      `argv` (sys.argv[1:]) and return an exit code.
    absl: run through absl.app with `parse_absl_flags`.
  """
  sys.argv = _strip_verbose(sys.argv)
  if absl:
    # deferred: absl where flags exist; errors stays stdlib-only (launcher).
    from absl import app  # pylint: disable=g-import-not-at-top
    app.run(guard(main), flags_parser=parse_absl_flags)
    sys.exit(OK)
  rc = guard(main)(sys.argv[1:])
  sys.exit(rc or OK)
