"""Process confinement for the calculator worker (serve/tools/sandbox.py) and the server's own processes.

    drop_privileges()  as root: no supplementary groups, gid and uid of `nobody` (65534 when there is no such user)
    deny_syscalls()    a seccomp filter: every syscall that opens a file, makes a socket, starts a process or program,
                       signals or inspects another process, or changes the filesystem fails with EPERM (x86-64 and
                       aarch64; elsewhere, or where the kernel refuses, it returns False and the worker keeps the
                       other layers: the AST whitelist, rlimits, no privileges, an empty environment)
    no_dump()          PR_SET_DUMPABLE 0: another process of the same user can no longer read this one's
                       /proc/PID/environ or memory (the server and engine processes call it)

Each returns whether it took effect; nothing here raises on a system without the feature.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct

PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 4, 38, 22, 2
EPERM = 1
RET_ALLOW, RET_ERRNO = 0x7FFF0000, 0x00050000 | EPERM

# name -> syscall number, per architecture (from the kernel's syscall tables)
_X86_64 = dict(open=2, socket=41, connect=42, accept=43, sendto=44, bind=49, listen=50, socketpair=53, clone=56,
               fork=57, vfork=58, execve=59, kill=62, truncate=76, ftruncate=77, rename=82, mkdir=83, rmdir=84,
               creat=85, link=86, unlink=87, symlink=88, chmod=90, fchmod=91, chown=92, fchown=93, lchown=94,
               ptrace=101, mknod=133, chroot=161, mount=165, umount2=166, tkill=200, tgkill=234, openat=257,
               mkdirat=258, mknodat=259, fchownat=260, unlinkat=263, renameat=264, linkat=265, symlinkat=266,
               fchmodat=268, unshare=272, fallocate=285, accept4=288, name_to_handle_at=303, open_by_handle_at=304,
               setns=308, process_vm_readv=310, process_vm_writev=311, renameat2=316, memfd_create=319, bpf=321,
               execveat=322, userfaultfd=323, io_uring_setup=425, io_uring_enter=426, io_uring_register=427,
               clone3=435, openat2=437, pidfd_open=434, pidfd_getfd=438)
_AARCH64 = dict(socket=198, connect=203, accept=202, sendto=206, bind=200, listen=201, socketpair=199, clone=220,
                execve=221, kill=129, truncate=45, ftruncate=46, mkdirat=34, mknodat=33, unlinkat=35, symlinkat=36,
                linkat=37, renameat=38, fchmod=52, fchmodat=53, fchownat=54, fchown=55, openat=56, ptrace=117,
                chroot=51, mount=40, umount2=39, tkill=130, tgkill=131, unshare=97, fallocate=47, accept4=242,
                name_to_handle_at=264, open_by_handle_at=265, setns=268, process_vm_readv=270,
                process_vm_writev=271, renameat2=276, memfd_create=279, bpf=280, execveat=281, userfaultfd=282,
                io_uring_setup=425, io_uring_enter=426, io_uring_register=427, clone3=435, openat2=437,
                pidfd_open=434, pidfd_getfd=438)
ARCHES = {"x86_64": (0xC000003E, _X86_64), "aarch64": (0xC00000B7, _AARCH64)}


def _prctl(*args: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(*[ctypes.c_ulong(a) for a in args]) == 0
    except (OSError, AttributeError):
        return False


def no_dump() -> bool:
    return os.name == "posix" and _prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


def drop_privileges() -> bool:
    """Run as `nobody` from now on when started as root; True when privileges were dropped."""
    if os.name != "posix" or os.geteuid() != 0:
        return False
    try:
        import pwd

        nobody = pwd.getpwnam("nobody")
        uid, gid = nobody.pw_uid, nobody.pw_gid
    except (ImportError, KeyError):
        uid = gid = 65534
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    return os.geteuid() == uid != 0


def _filter(arch_id: int, numbers: list[int]) -> bytes:
    """A classic-BPF seccomp program: wrong architecture or an x32 call -> EPERM; a listed call -> EPERM; else allow."""
    ld_w_abs, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    ins = [(ld_w_abs, 0, 0, 4),  # seccomp_data.arch
           (jeq, 1, 0, arch_id), (ret, 0, 0, RET_ERRNO),
           (ld_w_abs, 0, 0, 0),  # seccomp_data.nr
           (jge, len(numbers) + 1, 0, 0x40000000)]  # x32 ABI numbers
    for i, nr in enumerate(numbers):
        ins.append((jeq, len(numbers) - i, 0, nr))  # -> the EPERM return after the ALLOW
    ins += [(ret, 0, 0, RET_ALLOW), (ret, 0, 0, RET_ERRNO)]
    return b"".join(struct.pack("<HBBI", *i) for i in ins)


def deny_syscalls() -> bool:
    """Install the filter on this process (irreversible; inherited by any child). True when it is in force."""
    arch = ARCHES.get(platform.machine())
    if os.name != "posix" or platform.system() != "Linux" or arch is None:
        return False
    prog = _filter(arch[0], sorted(set(arch[1].values())))
    buf = ctypes.create_string_buffer(prog, len(prog))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog) // 8, ctypes.addressof(buf))
    if not _prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(ctypes.c_ulong(PR_SET_SECCOMP), ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(fprog),
                          ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0
    except (OSError, AttributeError):
        return False
