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
   (OK = 1 when it raised nothing), "NONCE INDEX 1 REPR" for an expression whose value is built of
   plain literals (REPR: its repr, which the parent reads back with `ast.literal_eval`; else OK = 0).
The nonce lets the parent ignore result lines the program forges without reading our memory. The
program runs in this process and can read it, so a statement's verdict is only as good as the
program's good faith; an expression's value is judged by the parent against an expected value this
process never sees (`r1jax.rewards.code`).
"""

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


_PLAIN = (int, float, complex, str, bytes, bool, type(None))
_CONTAINERS = (list, tuple, set, frozenset, dict)


def _plain_repr(value, budget: int = 100_000):
    """repr(value) if it is built of plain literals only (exact types: no subclass, no custom __eq__ or
    __repr__) and at most `budget` items; else None."""
    seen, stack = 0, [value]
    while stack:
        x = stack.pop()
        seen += 1
        if seen > budget or not (type(x) in _PLAIN or type(x) in _CONTAINERS):
            return None
        if type(x) is dict:
            stack.extend(x.keys())
            stack.extend(x.values())
        elif type(x) in _CONTAINERS:
            stack.extend(x)
    return repr(value)


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
    program, tests = payload["program"], payload["tests"]
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
                text = plain_repr(evaluate(build(test["eval"], f"test_{index}", "eval"), namespace))
                line = f"{nonce} {index} 0" if text is None else f"{nonce} {index} 1 {text}"
            else:
                run(build(test, f"test_{index}", "exec"), namespace)
                line = f"{nonce} {index} 1"
        except BaseException:  # noqa: B036
            line = f"{nonce} {index} 0"
        write(results, (line + "\n").encode())
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if ok else 1)


if __name__ == "__main__":
    main()
