"""
Reading a user's text files with clear errors, and writing files so that an interrupted run
never leaves half of one: whole-file writes
(temporary file, then rename), appends that land whole or not at all, checksums. Files get
the usual permissions (the umask's), not a temporary file's 0600. A failure of the
environment (no such folder, a read-only folder, a full disk, a path under a regular file)
becomes a one-line UserError naming the path.
"""

import hashlib
import hmac
import os
import secrets
import tempfile

from configurator import UserError


def umask_mode(mode=0o666):
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def cannot_write(path, e):
    """The one-line error for an OSError met writing `path`."""
    return UserError(f"cannot write {path}: {e.strerror or e}"
                     + (" (the disk is full)" if getattr(e, 'errno', None) == 28 else ''))


def make_dirs(path):
    try:
        os.makedirs(path, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"cannot create folder {path}: a file is in the way (a regular file where a folder "
                        f"should be)") from None
    except OSError as e:
        raise cannot_write(path, e) from None


def write_whole(path, data):
    """Write bytes or text to path through a temporary file in the same folder and os.replace:
    the path holds the old file or the new one, never half of one."""
    if os.path.isdir(path):
        raise UserError(f"cannot write {path}: it is a folder; give a file name")
    d = os.path.dirname(os.path.abspath(path))
    make_dirs(d)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=d)
        with os.fdopen(fd, 'wb') as f:
            f.write(data.encode('utf-8') if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except OSError as e:
        raise cannot_write(path, e) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def append_whole(path, text):
    """Append text to path in one write; if the write fails partway (a full disk), the file is
    cut back to where it was, so a record is never left half-written."""
    if os.path.isdir(path):
        raise UserError(f"cannot append to {path}: it is a folder; give a file name")
    if os.path.dirname(path):
        make_dirs(os.path.dirname(path))
    data = text.encode('utf-8')
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, umask_mode())
    except OSError as e:
        raise cannot_write(path, e) from None
    start = None
    try:
        regular = os.path.isfile(path)  # /dev/stdout and pipes cannot be cut back, nor need to be
        start = os.lseek(fd, 0, os.SEEK_END) if regular else None
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if regular:
            os.fsync(fd)
    except OSError as e:
        if start is not None:
            os.ftruncate(fd, start)
        raise cannot_write(path, e) from None
    finally:
        os.close(fd)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def seal_key_file() -> str:
    """This machine's key for seal(): $MEMORY_SEAL_KEY, else under the user's cache folder."""
    cache = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.environ.get('MEMORY_SEAL_KEY') or os.path.join(cache, 'persistent-memory', 'seal.key')


def seal(digest: str) -> str | None:
    """An HMAC of a file's digest under this machine's key (32 random bytes made on first use,
    readable by this user only): what this code wrote here can be told from a file that came
    from elsewhere with its digest written beside it. None where no key can be kept."""
    path = seal_key_file()
    try:
        try:
            with open(path, 'rb') as f:
                key = f.read()
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, 'wb') as f:
                    f.write(secrets.token_bytes(32))
            except FileExistsError:  # made meanwhile by another process
                pass
            with open(path, 'rb') as f:
                key = f.read()
    except OSError:
        return None
    return hmac.new(key, digest.encode(), 'sha256').hexdigest() if len(key) == 32 else None


def sealed(digest: str, claimed) -> bool:
    """True when `claimed` is seal(digest) made on this machine."""
    mine = seal(digest)
    return mine is not None and isinstance(claimed, str) and hmac.compare_digest(mine, claimed)


def read_text_file(path: str, what: str) -> str:
    """A user's text file, read whole: clear errors for missing, non-UTF-8 or empty files.
    One final newline (the one editors add) is dropped."""
    if not os.path.isfile(path):
        raise UserError(f"{what} file {path} does not exist" +
                        (f" (looked for {os.path.abspath(path)})" if not os.path.isabs(path) else ''))
    try:
        with open(path, encoding='utf-8') as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{what} file {path} is not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    except OSError as e:  # removed or made unreadable since it was listed
        raise UserError(f"{what} file {path} cannot be read ({e.strerror}); check it is still there") from None
    text = text[:-2] if text.endswith('\r\n') else text[:-1] if text.endswith('\n') else text
    if not text.strip():
        raise UserError(f"{what} file {path} is empty; put some text in it")
    return text
