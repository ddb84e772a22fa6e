"""In-sandbox launcher for `r1jax.rewards.sandbox`: run as `python -I _launcher.py ROOT_DIR`.

Runs (as the first process inside the sandbox, standard library only) in this order:
1. read and delete the payload (program, tests, nonce, limits) written by the parent;
2. in 'namespaces' mode (root, inside fresh mount/net/pid namespaces): bind ROOT_DIR on itself,
   expose the Python installation if an ancestor directory hides it from other users, remount every
   other mount read-only, mount a private /proc;
3. point stdout/stderr at files in ROOT_DIR/io (subject to RLIMIT_FSIZE), set resource limits;
4. in 'namespaces' mode drop to nobody (no groups, no new privileges); otherwise block sockets at
   the Python level (a best-effort prelude: ctypes can still reach the C library);
5. run the program in a fresh `__main__` namespace, then each test in that namespace, writing a line
   to a results file after each, so a timeout keeps partial credit: "NONCE INDEX OK" for a statement
   (OK = 1 when it raised nothing), "NONCE INDEX 1 REPR" for an expression whose value has a plain
   equivalent (`_plain`: a value of exact builtin literal types that `==` treats alike; REPR: its repr,
   which the parent reads back as a literal; else OK = 0). A line longer than the payload's
   max_line_bytes (each test's share of what the parent reads) is written as OK = 0 instead.
The nonce lets the parent ignore result lines the program forges without reading our memory. The
program runs in this process and can read it, so a statement's verdict is only as good as the
program's good faith; an expression's value is judged by the parent against an expected value this
process never sees (`r1jax.rewards.code`).
"""

import collections
import ctypes
import json
import os
import resource
import stat
import sys
import traceback

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_RELATIME = 32, 1024, 2048, 4096, 1 << 21
_OPT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
              "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _mount(libc, source, target, fstype, flags, data=None):
    enc = lambda s: s.encode() if s is not None else None
    if libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def _unescape(field):
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _hidden_python_paths():
    """{blocking ancestor: [paths to expose]} for Python paths other users cannot traverse to."""
    needed = {os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, sys.exec_prefix)}
    needed |= {os.path.realpath(p) for p in sys.path if p and os.path.isdir(p)}
    needed = sorted(needed)
    minimal = [p for p in needed if not any(q != p and p.startswith(q.rstrip("/") + "/") for q in needed)]
    blocked = {}
    for path in minimal:
        parts = path.strip("/").split("/")
        for k in range(1, len(parts)):
            ancestor = "/" + "/".join(parts[:k])
            if not os.stat(ancestor).st_mode & stat.S_IXOTH:
                blocked.setdefault(ancestor, []).append(path)
                break
    return blocked


def _isolate_filesystem(root_dir):
    libc = _libc()
    _mount(libc, root_dir, root_dir, None, MS_BIND)
    for ancestor, paths in _hidden_python_paths().items():
        fds = [(os.open(p, os.O_RDONLY | os.O_DIRECTORY), p) for p in paths]
        _mount(libc, "tmpfs", ancestor, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
        for fd, path in fds:
            os.makedirs(path, mode=0o755, exist_ok=True)
            _mount(libc, f"/proc/self/fd/{fd}", path, None, MS_BIND)
            os.close(fd)
    try:
        _mount(libc, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError:
        pass  # keep the host's /proc, remounted read-only below; as `nobody` it cannot read others' processes
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for fields in mounts:
        target = _unescape(fields[4])
        if target == root_dir:
            continue
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY
        for opt in fields[5].split(","):
            flags |= _OPT_FLAGS.get(opt, 0)
        try:
            _mount(libc, None, target, None, flags)
        except OSError:
            pass  # e.g. a mount hidden under another; it stays protected by file permissions


def _drop_privileges(uid, gid):
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    _libc().prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: no setuid binaries


def _block_sockets():
    import socket

    def refuse(*args, **kwargs):
        raise OSError(101, "network disabled in the sandbox")

    class NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            refuse()

    socket.socket = NoSocket
    for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
        setattr(socket, name, refuse)
    import _socket

    _socket.socket = NoSocket


class _NotPlain(Exception):
    pass


# A subclass of one of these stands for its base when its == and hash are the base's, so Python compares it
# with a literal exactly as it would the base value (also Counter's and OrderedDict's ==, which defer to
# dict's against any operand not of their own type, as a literal never is). Captured before the program
# runs, so a program that rebinds them loses the conversion rather than gaining one.
_BASE_EQ = {int: (int.__eq__,), float: (float.__eq__,), complex: (complex.__eq__,), str: (str.__eq__,),
            bytes: (bytes.__eq__,), list: (list.__eq__,), tuple: (tuple.__eq__,), set: (set.__eq__,),
            frozenset: (frozenset.__eq__,),
            dict: (dict.__eq__, collections.Counter.__eq__, collections.OrderedDict.__eq__)}
_SCALARS = (bool, int, float, complex, str, bytes)


def _base(t):
    """The builtin literal type `t` is, or stands for; None if its == or hash are its own."""
    if t in _BASE_EQ:
        return t
    for base, eqs in _BASE_EQ.items():
        if issubclass(t, base):
            return base if t.__eq__ in eqs and t.__hash__ is base.__hash__ else None
    return None


def _foreign_scalar(x):
    """The int, float, complex, bool, str or bytes that equals a NumPy scalar, Fraction or Decimal exactly.

    Each module is looked up, never imported: a value of its type means the program imported it."""
    t = type(x)
    numpy = sys.modules.get("numpy")
    if numpy is not None and getattr(numpy, t.__name__, None) is t and issubclass(t, numpy.generic):
        value = x.item()  # longdouble's item() stays a longdouble, a datetime64's is a datetime: refused
        if type(value) in _SCALARS and bool(x == value):  # NaN != NaN: refused
            return value
        raise _NotPlain
    fractions, decimal = sys.modules.get("fractions"), sys.modules.get("decimal")
    is_decimal = decimal is not None and t is decimal.Decimal
    if is_decimal or (fractions is not None and t is fractions.Fraction):
        if is_decimal and x.is_infinite():  # Decimal('Infinity') == 1e999
            return -float("inf") if x.is_signed() else float("inf")
        numerator, denominator = x.as_integer_ratio()  # a Decimal NaN raises: refused
        if denominator == 1:
            return numerator
        value = numerator / denominator
        if value.as_integer_ratio() == (numerator, denominator):  # else no literal equals x (e.g. 1/3)
            return value
    raise _NotPlain


def _plain(value, max_chars: int):
    """A value of exact builtin literal types that Python's == treats as `value` against any literal; raises
    _NotPlain if there is none or its repr would exceed `max_chars`.

    Containers and scalars whose == is their builtin base's are rebuilt through the base's own methods (a
    namedtuple becomes a tuple, a Counter a dict, a frozenset a set: `frozenset({1}) == {1}`); NumPy scalars,
    Fractions and Decimals become the int or float they equal exactly. A value containing NaN equals no
    literal (none is NaN), so it is refused like anything unrecognised; infinities repr as `inf`, which the
    parent reads back."""
    chars = 0

    def convert(x):
        nonlocal chars
        chars += 1 + (len(x) if type(x) in (str, bytes) else 0)  # a lower bound on the repr's length
        if chars > max_chars:
            raise _NotPlain
        t = type(x)
        if t is bool or x is None:
            return x
        base = _base(t)
        if base is None:
            x = _foreign_scalar(x)
            base = type(x)
            if base is bool:
                return x
        if base is int:
            return int.__int__(x)
        if base is float or base is complex:
            x = float.__float__(x) if base is float else complex.__complex__(x)
            if x != x:  # NaN
                raise _NotPlain
            return x
        if base is str:
            return str.__str__(x)
        if base is bytes:
            return bytes.__bytes__(x)
        if base is list:
            return [convert(item) for item in list.__iter__(x)]
        if base is tuple:
            return tuple(convert(item) for item in tuple.__iter__(x))
        if base is dict:
            out = {convert(key): convert(item) for key, item in dict.items(x)}
        else:  # set or frozenset; a frozenset member or key becomes an unhashable set: no literal has one
            out = {convert(item) for item in base.__iter__(x)}
        if len(out) != base.__len__(x):  # two members became equal: Python would have kept both
            raise _NotPlain
        return out

    return convert(value)


def _plain_repr(value, max_chars: int):
    """repr of `_plain(value)`; None if there is none."""
    try:
        return repr(_plain(value, max_chars))
    except (_NotPlain, ValueError, TypeError, OverflowError, RecursionError, MemoryError):
        return None  # ValueError: e.g. an int over sys.get_int_max_str_digits(), which no literal is


def main():
    root_dir = sys.argv[1]
    io_dir = os.path.join(root_dir, "io")
    payload_path = os.path.join(io_dir, "payload.json")
    with open(payload_path) as f:
        payload = json.load(f)
    os.unlink(payload_path)
    mode, nonce = payload["mode"], payload["nonce"]
    if mode == "namespaces":
        _isolate_filesystem(root_dir)
    for name in ("stdout", "stderr"):
        fd = os.open(os.path.join(io_dir, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(fd, 1 if name == "stdout" else 2)
        os.close(fd)
    sys.stdout = open(1, "w", encoding="utf-8", closefd=False)
    sys.stderr = open(2, "w", encoding="utf-8", closefd=False)
    results = os.open(os.path.join(io_dir, "results"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    for name, (soft, hard) in payload["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (soft, hard))
    if mode == "namespaces":
        _drop_privileges(payload["uid"], payload["gid"])
    if mode != "namespaces" and mode != "userns":
        _block_sockets()
    os.chdir(os.path.join(root_dir, "box"))
    program, tests, max_line = payload["program"], payload["tests"], payload["max_line_bytes"]
    del payload
    sys.argv = ["solution.py"]
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    # Our own references: the program may rebind the builtins and os.write before the tests run.
    run, evaluate, build, write, plain_repr = exec, eval, compile, os.write, _plain_repr
    ok = True
    try:
        run(build(program, "solution.py", "exec"), namespace)
    except SystemExit as e:
        ok = e.code in (None, 0)
    except BaseException:  # noqa: B036 - the program failed, whatever it raised
        traceback.print_exc()
        ok = False
    for index, test in enumerate(tests or ()):
        if not ok:
            break
        try:
            if isinstance(test, dict):  # {"eval": expression}: report its value
                text = plain_repr(evaluate(build(test["eval"], f"test_{index}", "eval"), namespace), max_line)
                line = f"{nonce} {index} 0\n" if text is None else f"{nonce} {index} 1 {text}\n"
            else:
                run(build(test, f"test_{index}", "exec"), namespace)
                line = f"{nonce} {index} 1\n"
            data = line.encode()
            if len(data) > max_line:  # fails this test alone: the parent reads max_line bytes per test
                raise ValueError(f"result line of {len(data)} bytes")
        except BaseException:  # noqa: B036
            data = f"{nonce} {index} 0\n".encode()
        write(results, data)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if ok else 1)


if __name__ == "__main__":
    main()
