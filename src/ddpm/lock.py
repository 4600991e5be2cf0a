"""One writer per run directory (and per sampling output): `RunLock`, an advisory lock on a small file held by a
process for as long as it writes there. Readers never take it.

The lock is `fcntl.flock` (LOCK_EX | LOCK_NB) on the lock file, held through an open file descriptor, so the
kernel drops it when the holder dies in any way (kill -9 included): a lock left by a dead process is simply a
lock file whose flock can be taken. The file holds JSON {pid, host, started, command, proc_start} written by
each holder, so that a refusal names the holder and a takeover of a stale lock warns naming the dead one. A
holder that finishes removes the file (while still holding the flock; a taker checks that the file it locked is
still the one at the path), so a lock file that is found with contents was left by a holder that did not finish.

Across hosts: on a shared filesystem the exclusion holds where flock reaches the file server (NFSv4, NFSv3 with
lockd, Lustre or BeeGFS mounted with flock support); a lost node's lock is freed when the server expires its
lease (NFSv4: about 90 s), and the next writer then takes it over with the warning. Where flock is local to each
client (NFS mounted with local_lock=flock or all) or missing, processes on one host still exclude each other:
the pid in the file is checked, and a holder on this host that is still running refuses the lock whatever
flock says; a holder on another host cannot be checked from here, which the takeover warning says.

No torch here: the command imports this before anything heavy.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

LOCK_FILE = ".lock"  # a run directory's lock: RUN/.lock


class LockedError(RuntimeError):
    """Another live process holds the lock: the message names the directory, the holder and the lock file."""


class StaleLockWarning(UserWarning):
    """A lock left by a process that died (or a lost node) was taken over; the message names the dead holder."""


def _proc_start(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks since boot (field 22 of /proc/PID/stat), None where there is
    no /proc. With the pid it names one process: a pid reused after a kill -9 has another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[19])  # after "pid (comm) ", field 3 is index 0


def _command() -> str:
    """This process's command line as a user typed it (`python -m ddpm ...` shown as `ddpm ...`)."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name == "__main__.py" and Path(argv[0]).parent.name == "ddpm":
        argv[0] = "ddpm"
    elif argv:
        argv[0] = Path(argv[0]).name
    return shlex.join(argv)


@dataclass
class Holder:
    """Who holds a lock, as its lock file says."""

    pid: int
    host: str
    started: str  # when the holder took the lock, ISO 8601 with the UTC offset
    command: str
    proc_start: int | None = None  # the holder's start in ticks since boot (see _proc_start); None: unknown

    @classmethod
    def me(cls) -> Holder:
        return cls(pid=os.getpid(), host=socket.gethostname(), started=datetime.now().astimezone().isoformat(timespec="seconds"),
                   command=_command(), proc_start=_proc_start(os.getpid()))

    def describe(self) -> str:
        return f"process {self.pid} on host {self.host}, started {self.started} ({self.command})"

    def running(self) -> bool | None:
        """Whether the holder still runs: True or False on this host, None on another (it cannot be seen)."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process of that pid
            pass
        start = _proc_start(self.pid)
        return self.proc_start is None or start is None or start == self.proc_start


def _read_holder(fd: int) -> Holder | None:
    """The holder written in the open lock file; None if it is empty (a clean release, or a holder that has not
    written yet) or not ours."""
    try:
        data = json.loads(os.pread(fd, 65536, 0).decode() or "null")
        return Holder(**data) if isinstance(data, dict) else None
    except (ValueError, TypeError, OSError):
        return None


class RunLock:
    """The lock of one run directory or sampling output, as a context manager: `with RunLock(RUN / LOCK_FILE,
    f"run directory {RUN}"): ...` (or `acquire()` and `release()`; a `with` on an acquired one releases it).

    `acquire` refuses at once (LockedError) while another live process holds it, and takes over a lock left by
    a dead holder with a StaleLockWarning. Not reentrant: a second RunLock on the same file in the same process
    is refused like any other writer. Only the process that acquired it releases it (a forked child does not).
    """

    def __init__(self, path: str | Path, what: str):
        self.path, self.what = Path(path), what
        self._fd: int | None = None
        self._owner: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _refuse(self, holder: Holder | None, why: str = "") -> LockedError:
        who = holder.describe() if holder else "a process that has not written its name yet"
        return LockedError(f"{self.what} is in use by {who}{why}; wait for it to finish or stop it (its lock: {self.path})")

    def _open_locked(self) -> tuple[int, bool]:
        """An fd of the lock file at self.path with the flock taken (or flock unsupported: False)."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    holder = _read_holder(fd)
                    os.close(fd)
                    dead = holder is not None and holder.running() is False
                    raise self._refuse(holder, ", which no longer runs: a process it started still holds the lock"
                                       if dead else "") from None
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                    os.close(fd)
                    raise
                return fd, False  # no locks on this filesystem: the pid check below is all there is
            # a holder releasing removes the file after we opened it: then we locked a file nobody else will see
            try:
                st, fst = os.stat(self.path), os.fstat(fd)
                if (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino):
                    return fd, True
            except FileNotFoundError:
                pass
            os.close(fd)

    def acquire(self) -> RunLock:
        """Take the lock (see the class); returns self."""
        if self.held:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, flocked = self._open_locked()
        old = _read_holder(fd)
        running = old.running() if old is not None else None
        if old is not None and (running or (running is None and not flocked)):
            os.close(fd)  # a live holder on this host (flock not shared), or one elsewhere that nothing can check
            raise self._refuse(old, "" if running else ", on another host, and this filesystem has no locks to tell "
                               f"whether it still runs: if it does not, remove {self.path}")
        if old is not None:
            how = ("it no longer runs (killed, or it crashed)" if running is False else
                   "it is on another host; flock says it is gone (its node lost), which this host cannot check")
            warnings.warn(f"taking over the stale lock of {self.what}: its holder, {old.describe()}, did not release "
                          f"it and {how}; continuing with what it left ({self.path})", StaleLockWarning, stacklevel=2)
        if not flocked:
            warnings.warn(f"{self.path}: the filesystem has no flock ({self.what}); only processes on this host are "
                          "kept out, through the pid in the lock file", stacklevel=2)
        me = json.dumps(asdict(Holder.me())).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, me, 0)
        os.fsync(fd)
        self._fd, self._owner = fd, os.getpid()
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock (nothing if not held, or in a forked child of the holder)."""
        fd, self._fd = self._fd, None
        if fd is None or self._owner != os.getpid():
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding the flock: see _open_locked
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:  # a lock already acquired (`ddpm.run.lock_for_writing`) is kept, then released
        return self if self.held else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:  # a holder dropped without release (a Trainer never trained): not a stale lock
        try:
            self.release()
        except Exception:  # interpreter shutdown: the kernel drops the flock anyway
            pass
