"""
blip2lora/files.py: writing and reading the project's files safely, and errors in one line.

How this project writes and reads back its own files, done one way everywhere (train.py, evaluate.py, caption.py,
adapter_files.py, checkpoint.py and the vision cache all come here):

- atomic_write(path, data): into a uniquely named temporary file beside the target, then renamed over it. A reader,
  or a kill at any moment, sees the old file or the new one, never half of one; two writers never share a temporary
  name; a full disk leaves no temporary file behind. Permissions follow the user's umask, as any file they make.
- read_json(path): the whole file, or one UserError line for everything that can be wrong with it: missing, a folder,
  not UTF-8, not JSON, nested absurdly deep, numbers too long to read.
- UserError: the base of every error that is the user's to fix (a setting, a file, a folder). The scripts run their
  work through one_line_errors, which prints it as one `error:` line, never a traceback.
"""
import contextlib
import errno
import json
import os
import stat
import sys
import tempfile
import unicodedata


class UserError(Exception):
    """A problem with the user's input, files or machine, reported in one line without a traceback."""


def one_line_errors(work):
    """Run a command's work; what is the user's to fix becomes one line on stderr and an exit code: a UserError (1, or
    its exit_code), an OSError such as a full disk (1), Ctrl-C (130). A closed output pipe (`caption.py DIR | head`)
    ends quietly: the reader has seen enough."""
    try:
        return work()
    except UserError as e:
        print(f"error: {printable(str(e))}", file=sys.stderr)
        return getattr(e, "exit_code", 1)
    except OSError as e:
        if isinstance(e, BrokenPipeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        print(f"error: {printable(str(e.filename or ''))}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def printable(name):
    """Text as one line: control characters (newline, tab, ...), line and paragraph separators (U+2028, U+2029, which
    str.splitlines() breaks at), format characters (U+202E reverses the text after it) and undecodable bytes written
    as escapes, so a file name can never forge a line or a column of the output, nor hide its own end."""
    return "".join(ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) in ESCAPED else ch
                   for ch in name)


ESCAPED = {"Cc", "Cs", "Cf", "Zl", "Zp"}  # unicodedata's categories: control, surrogate, format, line, paragraph


def inside(path, folder):
    """Whether path, with every symbolic link resolved, is folder or lies within it."""
    real, top = os.path.realpath(path), os.path.realpath(folder)
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


def first_line(error):
    """An exception's message as one line (some have none, e.g. what a 0-byte file gives)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def user_permissions(path, directory=False):
    """Give a file or folder made by tempfile (0600 / 0700) the permissions the user's umask gives new ones."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def user_permissions_tree(folder):
    """user_permissions for a folder and everything in it (some writers, safetensors among them, make files 0600)."""
    user_permissions(folder, directory=True)
    for parent, dirs, names in os.walk(folder):
        for name in dirs:
            user_permissions(os.path.join(parent, name), directory=True)
        for name in names:
            user_permissions(os.path.join(parent, name))


def make_temp_dir(beside):
    """A new, uniquely named folder beside `beside` (same disk, so a rename can replace it), with normal permissions."""
    parent = os.path.dirname(os.path.abspath(beside))
    os.makedirs(parent, exist_ok=True)
    path = tempfile.mkdtemp(prefix=f".{os.path.basename(beside)}.", suffix=".tmp", dir=parent)
    user_permissions(path, directory=True)
    return path


def output_kind(path):
    """What an output path is: "new" (nothing there), "file" (a regular file: replaced whole), "stream" (a FIFO or
    a device such as /dev/stdout, or a link to one: written in place, never renamed over), or None (anything else: a
    folder, a socket, a link to a file or folder, which this project does not replace)."""
    if not os.path.lexists(path):
        return "new"
    if stat.S_ISREG(os.lstat(path).st_mode):
        return "file"
    try:
        mode = os.stat(path).st_mode  # through links
    except OSError:
        return None
    return "stream" if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) else None


def check_output(path):
    """output_kind(path), or one line now, before any work, for an output path this project will not write."""
    kind = output_kind(path)
    if kind is None:
        what = "folder" if os.path.isdir(path) else "symbolic link" if os.path.islink(path) else "special file"
        raise UserError(f"{path}: is a {what}, which is not replaced; name a file (or a device or FIFO to write "
                        "through)")
    return kind


def atomic_write(path, data):
    """Write str or bytes to path through a unique temporary file in the same folder, then rename it over path.
    `data` may also be a function that writes a file at the path it is given (e.g. safetensors' save_file).
    A FIFO or a device (or a link to one) is written in place instead; anything else that is not a file is refused
    (check_output)."""
    if check_output(path) == "stream":
        if callable(data):  # a writer that wants a file path: let it write a temporary file, then pass its bytes on
            with tempfile.TemporaryDirectory() as folder:
                with writer_errors_as_os_errors(path):
                    data(os.path.join(folder, "out"))
                data = open(os.path.join(folder, "out"), "rb").read()
        with open(path, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        return
    folder = os.path.dirname(os.path.abspath(path))
    handle, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "wb") as f:
            if not callable(data):
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
        if callable(data):
            with writer_errors_as_os_errors(path):
                data(tmp)
        user_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)  # a full disk or a Ctrl-C leaves nothing behind
        raise


@contextlib.contextmanager
def writer_errors_as_os_errors(path):
    """torch.save and safetensors say a full disk as a RuntimeError ("unexpected pos 576 vs 534", torch 2.13) or a
    SafetensorError: make it the OSError naming `path` that every command turns into one line."""
    from safetensors import SafetensorError
    try:
        yield
    except (RuntimeError, SafetensorError) as e:
        full = "No space" in str(e) or "unexpected pos" in str(e)
        raise OSError(errno.ENOSPC if full else errno.EIO, f"cannot be written ({first_line(e)})", path) from None


def write_json(path, obj):
    atomic_write(path, json.dumps(obj, indent=1) + "\n")


def read_json(path, what="file"):
    """The JSON in path; a UserError naming the file for anything wrong with it."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8-sig")
        return json.loads(text)
    except FileNotFoundError:
        raise UserError(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a {what}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except RecursionError:
        raise UserError(f"{path}: not a valid {what} (JSON nested too deep)") from None
    except ValueError as e:  # not JSON, or a number of over 4,300 digits
        raise UserError(f"{path}: not valid JSON ({first_line(e)})") from None


def require_writable_folder(folder, what="output"):
    """Say now, before hours of work, that results cannot be written into folder (read-only, or not a folder)."""
    folder = folder or "."
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"{folder}: is a file, not a folder; name another place for the {what}")
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"{folder}: cannot write the {what} there ({e.strerror})") from None
