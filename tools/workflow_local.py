"""Run .github/workflows/wheels.yml here, job by job, step by step, as a runner would.

Why a script that reads the workflow and not `act`: act needs a Docker daemon and
registry images of GitHub's runners, neither of which this machine has; and what must be
proven is the workflow's own commands. So every `run:` step runs exactly as written
(bash, the step's `env:` and the workflow's, `${{ }}` expressions evaluated by the
small evaluator below, GITHUB_OUTPUT / GITHUB_ENV files read back into step outputs),
in the job order of `needs:`, with each job's `if:` and each step's `if:` evaluated.
The `uses:` steps are the only ones stood in for, each by the local action it does:

    actions/checkout            a fresh `git clone` of the commit under test, per job
    actions/setup-python        that CPython first on PATH (pyenv's, or PATH's pythonX.Y)
    docker/setup-buildx-action  nothing (podman builds)
    docker/build-push-action    `docker build` (podman) with the step's `with:` inputs
    actions/cache/restore|save  a directory per key under --state (restore-keys by prefix)
    actions/upload|download-artifact   a directory per artifact name under --state
    actions/upload-pages-artifact, actions/deploy-pages   the site is kept, not deployed

`docker` is podman (a shim first on PATH: podman with runc and this process's hard
ulimits, as the factory runs it). What a runner would not do: the image build gets
BASE=$BASE_IMAGE when set (no registry here: a local base image, tools/make_base_image.sh);
where this host's pip trusts a CA bundle of its own (a TLS-inspecting proxy: pip's
`global.cert`, PIP_CERT, SSL_CERT_FILE), the image build mounts it read-only where the
image's RUN steps look (pip, uv: PIP_CERT, SSL_CERT_FILE) so they reach PyPI as the host does;
FLASH_ATTN_SMOKE_REQUIRE_GPU=0 (no GPU runner here: the smoke gate's GPU part is skipped,
and its record says so) and FLASH_ATTN_ALLOW_NO_GPU=1 (publish accepts those records);
the smoke-gpu job runs on this machine. --cells keeps the matrix entries whose id
matches, --per-minor one cell per torch minor, and the kernel groups those cells need;
everything else is the workflow's.

    python3 tools/workflow_local.py --matrix release --cells 'cp311$' --state /var/tmp/wf
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / ".github" / "workflows" / "wheels.yml"
JOB_ORDER = ("plan", "kernels", "build", "smoke-gpu", "publish")

# --- ${{ }} expressions: the subset the workflow uses ----------------------------------

_TOKEN = re.compile(
    r"\s*(?:(?P<str>'(?:[^']|'')*')|(?P<num>\d+(?:\.\d+)?)|(?P<op>\|\||&&|==|!=|!|\(|\)|,|\.)"
    r"|(?P<name>[A-Za-z_][\w-]*))"
)


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ValueError(f"cannot read expression {text!r} at {text[pos:]!r}")
        kind = m.lastgroup or ""
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


class Expr:
    """Evaluate one expression against a context dict (github, env, matrix, steps,
    needs, inputs) and the job status functions."""

    def __init__(self, text: str, context: dict[str, Any], status: str = "success") -> None:
        self.toks = _tokens(text)
        self.i = 0
        self.ctx = context
        self.status = status

    def value(self) -> Any:
        v = self._or()
        if self.i != len(self.toks):
            raise ValueError(f"trailing tokens in expression: {self.toks[self.i :]}")
        return v

    def _peek(self) -> str:
        return self.toks[self.i][1] if self.i < len(self.toks) else ""

    def _take(self) -> tuple[str, str]:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def _or(self) -> Any:
        v = self._and()
        while self._peek() == "||":
            self._take()
            right = self._and()
            v = v if truthy(v) else right
        return v

    def _and(self) -> Any:
        v = self._cmp()
        while self._peek() == "&&":
            self._take()
            right = self._cmp()
            v = right if truthy(v) else v
        return v

    def _cmp(self) -> Any:
        v = self._unary()
        while self._peek() in ("==", "!="):
            op = self._take()[1]
            right = self._unary()
            same = str(v).lower() == str(right).lower() if v is not None else right is None
            v = same if op == "==" else not same
        return v

    def _unary(self) -> Any:
        if self._peek() == "!":
            self._take()
            return not truthy(self._unary())
        return self._primary()

    def _primary(self) -> Any:
        kind, text = self._take()
        if text == "(":
            v = self._or()
            self._take()
            return v
        if kind == "str":
            return text[1:-1].replace("''", "'")
        if kind == "num":
            return float(text)
        if text in ("true", "false"):
            return text == "true"
        if self._peek() == "(":
            self._take()
            args = []
            while self._peek() != ")":
                args.append(self._or())
                if self._peek() == ",":
                    self._take()
            self._take()
            return self._call(text, args)
        v: Any = self.ctx.get(text)
        while self._peek() == ".":
            self._take()
            key = self._take()[1]
            v = v.get(key) if isinstance(v, dict) else None
        return v

    def _call(self, name: str, args: list[Any]) -> Any:
        if name == "always":
            return True
        if name == "cancelled":
            return False
        if name == "success":
            return self.status == "success"
        if name == "failure":
            return self.status == "failure"
        if name == "fromJSON":
            return json.loads(str(args[0]))
        if name == "startsWith":
            return str(args[0] or "").lower().startswith(str(args[1]).lower())
        if name == "format":
            text = str(args[0])
            for n, a in enumerate(args[1:]):
                text = text.replace("{" + str(n) + "}", str(a))
            return text
        raise ValueError(f"function {name}() is not known to the replay")


def truthy(v: Any) -> bool:
    return v not in (None, False, "", 0, 0.0)


_EXPR = re.compile(r"\$\{\{(.*?)\}\}", re.S)


def render(value: Any, ctx: dict[str, Any], status: str = "success") -> Any:
    """A workflow value with every ${{ }} evaluated (a whole-value expression keeps its
    type, e.g. fromJSON's dict)."""
    if isinstance(value, dict):
        return {k: render(v, ctx, status) for k, v in value.items()}
    if isinstance(value, list):
        return [render(v, ctx, status) for v in value]
    if not isinstance(value, str):
        return value
    whole = _EXPR.fullmatch(value.strip())
    if whole:
        return Expr(whole.group(1), ctx, status).value()

    def one(m: re.Match[str]) -> str:
        v = Expr(m.group(1), ctx, status).value()
        return "" if v is None else (json.dumps(v) if isinstance(v, (dict, list)) else str(v))

    return _EXPR.sub(one, value)


def condition(text: Any, ctx: dict[str, Any], status: str) -> bool:
    """A step's or job's `if:` (bare or in ${{ }}); absent: success()."""
    if text is None:
        return status == "success"
    if isinstance(text, bool):
        return text
    inner = _EXPR.fullmatch(str(text).strip())
    expr = inner.group(1) if inner else str(text)
    uses_status = re.search(r"\b(always|failure|cancelled|success)\(", expr)
    ok = truthy(Expr(expr, ctx, status).value())
    return ok if uses_status else ok and status == "success"


# --- the runner --------------------------------------------------------------------------


@dataclass
class StepResult:
    job: str
    name: str
    outcome: str  # success, failure, skipped
    seconds: float
    note: str = ""


@dataclass
class Replay:
    state: Path
    commit: str
    ctx_base: dict[str, Any]
    results: list[StepResult] = field(default_factory=list)
    log: Path | None = None

    def say(self, text: str) -> None:
        print(text, flush=True)
        if self.log is not None:
            with self.log.open("a") as f:
                f.write(text + "\n")

    def workspace(self, job_id: str) -> Path:
        ws = self.state / "runners" / job_id / "work"
        if ws.exists():
            shutil.rmtree(ws)
        ws.parent.mkdir(parents=True, exist_ok=True)
        return ws

    def run_job(
        self, name: str, job: dict[str, Any], matrix: dict[str, Any] | None, needs: dict[str, Any]
    ) -> tuple[str, dict[str, Any]]:
        job_id = name + ("-" + str(matrix.get("id") or matrix.get("group")) if matrix else "")
        ws = self.workspace(job_id)
        env_bin = self.state / "runners" / job_id / "bin"
        env_bin.mkdir(parents=True, exist_ok=True)
        docker_shim(env_bin / "docker")
        path = f"{env_bin}{os.pathsep}{os.environ['PATH']}"
        env: dict[str, str] = {}
        ctx = {**self.ctx_base, "matrix": matrix or {}, "needs": needs, "steps": {}}
        ctx["env"] = {**ctx["env"]}
        for k, v in (job.get("env") or {}).items():
            ctx["env"][k] = str(render(v, ctx))
        status = "success"
        self.say(f"== job {job_id}")
        for i, step in enumerate(job["steps"]):
            sid = step.get("id", f"step{i}")
            label = step.get("name") or step.get("uses") or step.get("run", "")[:60]
            if not condition(step.get("if"), ctx, status):
                self.results.append(StepResult(job_id, label, "skipped", 0.0))
                ctx["steps"][sid] = {"outcome": "skipped", "outputs": {}}
                continue
            start = time.perf_counter()
            outputs: dict[str, str] = {}
            try:
                step_env = {k: str(render(v, ctx)) for k, v in (step.get("env") or {}).items()}
                full_env = {**os.environ, **ctx["env"], **env, **step_env, "PATH": path}
                if "run" in step:
                    outputs, extra_env = self.run_step(render(step["run"], ctx), ws, full_env)
                    env.update(extra_env)
                else:
                    outputs, path = self.use_step(
                        step, render(step.get("with") or {}, ctx), ws, path, job_id
                    )
                outcome = "success"
            except StepFailed as e:
                outcome = "failure"
                self.say(f"   step failed: {e}")
            seconds = time.perf_counter() - start
            ctx["steps"][sid] = {"outcome": outcome, "outputs": outputs}
            self.results.append(StepResult(job_id, label, outcome, seconds))
            self.say(f"-- {job_id}: {label}: {outcome} ({seconds:.1f} s)")
            if outcome == "failure":
                status = "failure"
        job_outputs = render(job.get("outputs") or {}, ctx)
        return status, job_outputs

    def run_step(
        self, script: str, ws: Path, env: dict[str, str]
    ) -> tuple[dict[str, str], dict[str, str]]:
        files = ws.parent / "files"
        files.mkdir(exist_ok=True)
        out, genv = files / "output", files / "env"
        out.write_text("")
        genv.write_text("")
        env = {**env, "GITHUB_OUTPUT": str(out), "GITHUB_ENV": str(genv)}
        env.pop("GITHUB_STEP_SUMMARY", None)
        log = ws.parent / "steps.log"
        with log.open("a") as f:
            f.write(f"$ {script}\n")
            f.flush()
            done = subprocess.run(
                ["bash", "-e", "-c", script],
                cwd=ws,
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
                check=False,
            )
        if done.returncode != 0:
            tail = log.read_text(errors="replace").splitlines()[-12:]
            raise StepFailed(
                f"exit {done.returncode}; last lines of {log}:\n   " + "\n   ".join(tail)
            )
        return read_kv(out.read_text()), read_kv(genv.read_text())

    def use_step(
        self, step: dict[str, Any], args: dict[str, Any], ws: Path, path: str, job_id: str
    ) -> tuple[dict[str, str], str]:
        action = str(step["uses"]).split("@")[0]
        if action == "actions/checkout":
            run(["git", "clone", "-q", str(REPO), str(ws)])
            run(["git", "-C", str(ws), "checkout", "-q", self.commit])
            return {}, path
        if action == "actions/setup-python":
            exe = find_python(str(args["python-version"]))
            shim = ws.parent / f"python-{args['python-version']}"
            shim.mkdir(exist_ok=True)
            for name in ("python", "python3"):
                link = shim / name
                link.unlink(missing_ok=True)
                link.symlink_to(exe)
            venv = ws.parent / f"venv-{args['python-version']}"
            if not venv.exists():  # a runner's python is its own: pip installs into it
                run([exe, "-m", "venv", str(venv)])
            return {
                "python-path": str(venv / "bin" / "python")
            }, f"{venv / 'bin'}{os.pathsep}{path}"
        if action in (
            "docker/setup-buildx-action",
            "actions/upload-pages-artifact",
            "actions/deploy-pages",
        ):
            return {}, path
        if action == "docker/build-push-action":
            argv = ["docker", "build", "-f", str(ws / args["file"]), "-t", args["tags"]]
            argv.append("--force-rm")  # as the factory's builds: no working container left
            for line in str(args.get("build-args") or "").splitlines():
                if line.strip():
                    argv += ["--build-arg", line.strip()]
            if os.environ.get("BASE_IMAGE"):
                argv += ["--build-arg", f"BASE={os.environ['BASE_IMAGE']}"]
            argv += host_ca_args()
            context = Path(args["context"])
            argv.append(str(context if context.is_absolute() else ws / context))
            log = ws.parent / "image.log"
            with log.open("w") as f:
                done = subprocess.run(
                    argv,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    check=False,
                    env={**os.environ, "PATH": path},
                )
            if done.returncode != 0:
                raise StepFailed(f"image build exit {done.returncode}: see {log}")
            return {}, path
        if action == "actions/cache/restore":
            return self.cache_restore(args, ws), path
        if action == "actions/cache/save":
            key = str(args["key"])
            dest = self.state / "cache" / key
            if not dest.exists():
                shutil.copytree(ws / args["path"], dest)
            return {}, path
        if action == "actions/upload-artifact":
            dest = self.state / "artifacts" / str(args["name"])
            if dest.exists():
                shutil.rmtree(dest)
            dest.mkdir(parents=True)
            found = 0
            for pattern in str(args["path"]).split():
                for hit in ws.glob(pattern.rstrip("/") + ("/*" if pattern.endswith("/") else "")):
                    if hit.is_file():
                        shutil.copy2(hit, dest / hit.name)
                        found += 1
            if not found and args.get("if-no-files-found") == "error":
                raise StepFailed(f"no files for artifact {args['name']} at {args['path']}")
            return {}, path
        if action == "actions/download-artifact":
            target = ws / str(args["path"])
            names = [str(args["name"])] if "name" in args else None
            pattern = str(args.get("pattern", "*"))
            for src in sorted((self.state / "artifacts").glob(pattern)):
                if names and src.name not in names:
                    continue
                dest = target if names else target / src.name
                dest.mkdir(parents=True, exist_ok=True)
                for f in src.iterdir():
                    shutil.copy2(f, dest / f.name)
            if names and not (self.state / "artifacts" / names[0]).is_dir():
                raise StepFailed(f"artifact {names[0]} does not exist")
            return {}, path
        raise StepFailed(f"the replay has no stand-in for {action}")

    def cache_restore(self, args: dict[str, Any], ws: Path) -> dict[str, str]:
        key = str(args["key"])
        root = self.state / "cache"
        root.mkdir(parents=True, exist_ok=True)
        hit = root / key if (root / key).is_dir() else None
        exact = hit is not None
        if hit is None:
            for prefix in str(args.get("restore-keys") or "").splitlines():
                found = sorted(
                    (p for p in root.iterdir() if p.name.startswith(prefix.strip())),
                    key=lambda p: p.stat().st_mtime,
                )
                if prefix.strip() and found:
                    hit = found[-1]
                    break
        if hit is not None:
            shutil.copytree(hit, ws / args["path"], dirs_exist_ok=True)
        return {"cache-hit": "true" if exact else "false"}


class StepFailed(Exception):
    pass


def read_kv(text: str) -> dict[str, str]:
    """GITHUB_OUTPUT / GITHUB_ENV: name=value lines and name<<EOF heredocs."""
    out: dict[str, str] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            name, delim = line.split("<<", 1)
            body = []
            i += 1
            while i < len(lines) and lines[i] != delim:
                body.append(lines[i])
                i += 1
            out[name] = "\n".join(body)
        elif "=" in line:
            name, _, value = line.partition("=")
            out[name] = value
        i += 1
    return out


def run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise StepFailed(f"{' '.join(argv)}: {done.stderr.strip()[-400:]}")


def find_python(version: str) -> str:
    """pyenv's CPython of that minor, else pythonX.Y on PATH."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    for d in sorted(root.glob(f"{version}.*"), reverse=True):
        if (d / "bin" / f"python{version}").is_file():
            return str(d / "bin" / f"python{version}")
    exe = shutil.which(f"python{version}")
    if exe is None:
        raise StepFailed(f"no CPython {version} here (pyenv or PATH)")
    return exe


# Where the build's RUN steps find the host's CA bundle (a Debian path; the image's own
# bundle there is what the variables name once the build is over).
CA_IN_BUILD = "/etc/ssl/certs/ca-certificates.crt"


def host_ca_bundle() -> Path | None:
    """The CA bundle this host's pip is told to trust (PIP_CERT, SSL_CERT_FILE,
    REQUESTS_CA_BUNDLE, else pip's config `global.cert`), None when it trusts the default:
    a host behind a TLS-inspecting proxy reaches PyPI only with it."""
    for name in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        if os.environ.get(name):
            return Path(os.environ[name])
    done = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.cert"],
        capture_output=True,
        text=True,
        check=False,
    )
    value = done.stdout.strip()
    return Path(value) if done.returncode == 0 and value else None


def host_ca_args() -> list[str]:
    """`docker build` arguments that let the image's pip and uv trust the host's CA
    bundle during the build (mounted read-only, not copied into any layer)."""
    bundle = host_ca_bundle()
    if bundle is None:
        return []
    if not bundle.is_file():
        raise StepFailed(f"the host's CA bundle {bundle} (pip's cert setting) is not a file")
    argv = ["--volume", f"{bundle.resolve()}:{CA_IN_BUILD}:ro"]
    for name in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        argv += ["--env", f"{name}={CA_IN_BUILD}"]
    return argv


def docker_shim(path: Path) -> None:
    """`docker` as podman with runc and the factory's ulimits (engine.py)."""
    sys.path.insert(0, str(REPO))
    from scripts.factory.engine import ContainerEngine

    engine = ContainerEngine.select("podman")
    base = " ".join(engine.base())
    ulimits = " ".join(engine.ulimit_args())
    path.write_text(
        "#!/bin/sh\n# the replay's docker: podman (tools/workflow_local.py)\n"
        f'cmd="$1"; shift\n'
        f'case "$cmd" in run|build) exec {base} "$cmd" {ulimits} "$@";; '
        f'*) exec {base} "$cmd" "$@";; esac\n'
    )
    path.chmod(0o755)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--matrix", default="release", help="the workflow_dispatch input")
    p.add_argument("--cells", default="", help="a regex: keep the build cells whose id matches")
    p.add_argument(
        "--per-minor",
        action="store_true",
        help="keep one cell per torch minor (and binding): the first that --cells keeps",
    )
    p.add_argument("--state", type=Path, default=Path("/var/tmp/flash-attn-workflow"))
    p.add_argument("--jobs", default=",".join(JOB_ORDER), help="the jobs to run, in order")
    p.add_argument("--commit", default="HEAD")
    args = p.parse_args(argv)
    state: Path = args.state.resolve()
    state.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", args.commit],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    wf = yaml.safe_load(WORKFLOW.read_text())
    wf["on"] = wf.pop(True, wf.get("on"))
    base_ctx: dict[str, Any] = {
        "github": {
            "event_name": "workflow_dispatch",
            "ref": "refs/heads/local",
            "ref_name": "local",
            "run_id": "1",
            "run_attempt": "1",
            "token": "",
        },
        "inputs": {"matrix": args.matrix, "publish": True},
        "env": {},
    }
    for k, v in (wf.get("env") or {}).items():
        base_ctx["env"][k] = str(render(v, base_ctx))
    base_ctx["env"].update({"FLASH_ATTN_SMOKE_REQUIRE_GPU": "0", "FLASH_ATTN_ALLOW_NO_GPU": "1"})
    replay = Replay(state, commit, base_ctx, log=state / "replay.log")
    replay.say(f"replay of {WORKFLOW.name} at {commit[:12]}, MATRIX={args.matrix!r}")
    needs: dict[str, Any] = {}
    wanted = args.jobs.split(",")
    for name in JOB_ORDER:
        if name not in wanted:
            continue
        job = wf["jobs"][name]
        ctx = {**base_ctx, "needs": needs}
        if "if" in job and not condition(job["if"], ctx, "success"):
            replay.say(f"== job {name}: skipped by its if:")
            continue
        entries: list[dict[str, Any] | None] = [None]
        if "strategy" in job:
            entries = list(render(job["strategy"]["matrix"], ctx)["include"])
            entries = select_entries(name, entries, args, needs)
        statuses = []
        outputs: dict[str, Any] = {}
        for entry in entries:
            status, outputs = replay.run_job(name, job, entry, needs)
            statuses.append(status)
        result = "success" if all(s == "success" for s in statuses) else "failure"
        needs[name] = {"result": result, "outputs": outputs}
        replay.say(f"== {name}: {len(entries)} job(s), {statuses.count('success')} succeeded")
    summary = [r.__dict__ for r in replay.results]
    (state / "replay.json").write_text(json.dumps(summary, indent=2) + "\n")
    failed = [r for r in replay.results if r.outcome == "failure"]
    replay.say(
        f"replay: {len(replay.results)} steps, {len(failed)} failed; {state / 'replay.json'}"
    )
    return 1 if failed else 0


def select_entries(
    job: str, entries: list[dict[str, Any]], args: argparse.Namespace, needs: dict[str, Any]
) -> list[dict[str, Any]]:
    """The build, smoke and kernel jobs of the cells --cells / --per-minor keep."""
    if not args.cells and not args.per_minor:
        return entries
    plan = json.loads(needs["plan"]["outputs"]["matrix"])["include"]
    keep: dict[tuple[str, str], dict[str, Any]] = {}
    for cell in plan:
        if args.cells and not re.search(args.cells, cell["id"]):
            continue
        key = (cell["torch"], cell["binding"]) if args.per_minor else (cell["id"], "")
        keep.setdefault(key, cell)
    cells = list(keep.values())
    if job == "kernels":
        return [e for e in entries if any(c["cuda"] == e["cuda"] for c in cells)]
    return [e for e in entries if any(c["id"] == e["id"] for c in cells)]


if __name__ == "__main__":
    sys.exit(main())
