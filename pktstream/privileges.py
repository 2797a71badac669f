"""Drop root after the capture handles are open, keeping only what capturing needs.

``drop_privileges("pktstream")`` switches to that user (and its group, or ``group``), clears
supplementary groups, and keeps exactly CAP_NET_RAW and CAP_NET_ADMIN in the permitted and
effective sets (so interfaces that appear later can still be opened); every other capability,
including the ability to regain root, is gone. Linux only.
"""
from __future__ import annotations

import ctypes
import grp
import logging
import os
import pwd
import stat

log = logging.getLogger("pktstream")

PR_SET_KEEPCAPS = 8
PR_SET_NO_NEW_PRIVS = 38
CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def drop_privileges(user: str, group: str | None = None,
                    keep: tuple[int, ...] = (CAP_NET_RAW, CAP_NET_ADMIN)) -> None:
    """Become ``user``/``group`` keeping only the capabilities in ``keep``."""
    if os.geteuid() != 0:
        raise PermissionError("dropping privileges needs to start as root")
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise ValueError(f"no such user {user!r}") from None
    try:
        gid = grp.getgrnam(group).gr_gid if group else pw.pw_gid
    except KeyError:
        raise ValueError(f"no such group {group!r}") from None
    libc = _libc()
    _check(libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
    os.setgroups([])
    os.setgid(gid)
    os.setuid(pw.pw_uid)
    mask = 0
    for cap in keep:
        mask |= 1 << cap
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)(_CapData(mask, mask, 0), _CapData(0, 0, 0))
    _check(libc.capset(ctypes.byref(header), data), "capset")
    _check(libc.prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0), "prctl(PR_SET_KEEPCAPS, 0)")
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    log.info("running as %s (uid %d, gid %d) with only CAP_NET_RAW/CAP_NET_ADMIN", user, pw.pw_uid, gid)


def chown_for(fd: int, user: str, group: str | None = None) -> None:
    """Give a directory we created as root (e.g. the spool; ``fd``: a descriptor of it open)
    and the entries directly in it to the user we will become. Links are never followed: the
    directory's path, symbolic links in it and hard links (files with more than one name) are
    left as they are (that user owned the directory before: a link it planted there would
    otherwise hand its target, any file of the host, over)."""
    pw = pwd.getpwnam(user)
    gid = grp.getgrnam(group).gr_gid if group else pw.pw_gid
    os.chown(fd, pw.pw_uid, gid)
    for name in os.listdir(fd):
        # only files of our own, checked and changed through one descriptor (no swap between
        # the two): a symbolic link (ELOOP), a hard link to another file (its inode would
        # change hands) or anything but a regular file or directory is left as it is
        try:
            efd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
        except OSError:
            continue
        try:
            st = os.fstat(efd)
            if stat.S_ISDIR(st.st_mode) or (stat.S_ISREG(st.st_mode) and st.st_nlink == 1):
                os.chown(efd, pw.pw_uid, gid)
        finally:
            os.close(efd)
