"""The README, CONTRIBUTING.md and the docs pages, as a user reads them: every recipe and make target documented, the
troubleshooting page's topics, no reference to files a user does not have, and every shell command in a
fenced block runs as written.

Every ```bash / ```sh / ```console block of README.md, CONTRIBUTING.md and docs/**/*.md is split into simple commands and
checked: a `make` target exists in the Makefile (and each VAR=value given to make is one of its variables);
`python X.py` and `python -m X` exist in the repository, and every --flag given to one of them is an option
of its argparse parser (read from its own --help); `ray` and `mlflow` subcommands and their flags exist
in the installed CLIs; every repository path named exists; every environment variable set or expanded is
read by the project or is a well-known one of the tools it runs (listed below). Commands that cost little
run for real (`--help`, `python -m pipeline.model.summary`). Anything else (kubectl, docker, aws, curl,
...) must be a known external tool; a program the checker does not know fails the test."""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import list_recipes

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
DOCS = REPO / "docs"
PY = sys.executable
BIN = Path(PY).parent


def doc_files() -> list[Path]:
    return [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted(DOCS.rglob("*.md"))]


def all_docs_text() -> str:
    return "\n".join(p.read_text() for p in doc_files())


def product_files():
    for folder in ("pipeline", "jobs", "infra", "benchmarks", "docs"):
        yield from (p for p in (REPO / folder).rglob("*") if p.is_file() and p.suffix in (".py", ".yaml", ".md", ".sh"))
    yield REPO / "README.md"
    yield REPO / "Makefile"


# ------------------------------------------------------------------------------------------- content


def test_no_product_text_cites_a_design_file_users_do_not_have():
    cites = [str(p.relative_to(REPO)) for p in product_files() if "DESIGN.md" in p.read_text()]
    assert cites == []


def test_every_recipe_and_make_target_is_documented():
    text = all_docs_text()
    for name in list_recipes():
        assert f"`{name}`" in text, name
    targets = re.findall(r"^([a-z][a-z-]*):", (REPO / "Makefile").read_text(), flags=re.M)
    make_page = (DOCS / "reference" / "make-targets.md").read_text()
    for t in set(targets) - {"help", "data"}:
        assert re.search(rf"`make {t}`|`{t}`", make_page), t
    for var in ("EVAL_WORKERS", "EVAL_LIMIT", "RECIPE", "DEMO_MINUTES", "MLFLOW_PORT", "RUN_DIR"):
        assert var in make_page, var
    for var in ("INCEPTION_DEVICE", "INCEPTION_TRACKING_WAIT_S", "INCEPTION_SHARD_CACHE",
                "INCEPTION_SERVE_MAX_IMAGES", "MLFLOW_TRACKING_URI", "RAY_AUTH_MODE"):
        assert var in (DOCS / "reference" / "environment.md").read_text(), var


def test_troubleshooting_covers_what_users_meet():
    page = (DOCS / "operations" / "troubleshooting.md").read_text()
    for topic in ("/dev/shm", "NCCL", "nvidia-dali-cuda130", "144 crops", "autoscaler", "--working-dir",
                  "401", "PreemptionWatcher"):
        assert topic in page, topic


def test_the_readme_is_short_and_links_every_everyday_task_to_its_page():
    assert len(README.splitlines()) <= 210
    table = README.split("## I want to", 1)[1].split("\n## ", 1)[0]
    links = dict(re.findall(r"^\|\s*(.+?)\s*\|\s*\[[^\]]+\]\(([^)]+)\)", table, flags=re.M))
    for page in ("docs/guides/imagenet-one-machine.md", "docs/guides/resume-and-stop.md", "docs/guides/serve.md",
                 "docs/guides/configure.md", "docs/guides/aws.md", "docs/getting-started/demo.md"):
        assert page in links.values(), page
    for target in links.values():
        assert (REPO / target.split("#")[0]).is_file(), target


def test_readme_headings_are_the_users():
    """The README is the project's front page: what it is, its results, how to run it, where to go next.
    Anything else (how it is developed, tested or benchmarked over time) lives in CONTRIBUTING.md."""
    headings = re.findall(r"^#{1,3} (.+)$", README, flags=re.M)
    allowed = {"inception-pipeline", "Results", "Quick start", "I want to...", "What is in the box", "Status",
               "License and citation"}
    assert set(headings) <= allowed, set(headings) - allowed


def test_every_link_between_pages_leads_to_a_file():
    broken = []
    for page in doc_files():
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            if not (page.parent / target).resolve().exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert broken == []


def test_figures_name_the_machine_they_were_measured_on():
    assert "this 2-core machine" not in all_docs_text()
    assert "about 2.5 minutes" not in (REPO / "pipeline" / "recipes" / "demo.yaml").read_text()
    perf = (DOCS / "explanation" / "performance.md").read_text()
    assert "AMD EPYC" in perf and "2026-12-04" in perf


def test_unused_dependencies_are_not_declared():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"tqdm' not in pyproject and '"requests' not in pyproject


def test_gpu_page_gives_the_online_and_offline_commands():
    gpu = (DOCS / "guides" / "gpu-check.md").read_text()
    assert "pip install -e ." in gpu and "python benchmarks/gpu/run.py --out gpu-results" in gpu  # online
    assert "make gpu-kit" in gpu and "python benchmarks/gpu/run.py --install gpu-kit --out gpu-results" in gpu


# ------------------------------------------------------------------------------ commands in the docs

# Programs the project does not ship, run on the user's machine or cluster; not checked beyond existing
# here as a name.
EXTERNAL = {"kubectl", "docker", "aws", "curl", "rsync", "pip", "apt-get", "sudo", "git", "nvidia-smi", "base64",
            "cat", "ls", "du", "df", "echo", "export", "source", "cd", "mkdir", "tar", "ssh", "scp", "sleep",
            "wait", "kill", "tail", "head", "python3", "sha256sum", "chmod", "sed", "env", "open", "xdg-open", "printf",
            "openssl", "lscpu"}
# Environment variables read by the tools the project runs (Ray, MLflow, the AWS SDKs, NCCL, the shell)
# rather than by the project's own code.
EXTERNAL_ENV = {"HOME", "PWD", "PATH", "USER", "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                "RAY_AUTH_TOKEN_PATH", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_PROFILE", "NCCL_DEBUG",
                "NCCL_SOCKET_IFNAME", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "CUDA_VISIBLE_DEVICES",
                "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "RAY_JOB_STOP_WAIT_TIME_S", "XDG_CACHE_HOME",
                "PIPELINE_PASSWORD"}  # the last: the jobs' MLflow password, which the examples read from the user's shell
REPO_TOP = {p.name for p in REPO.iterdir() if not p.name.startswith(".") or p.name in (".run", ".gitignore")}
FENCE = re.compile(r"^([ \t]*)```(bash|sh|console)[^\n]*\n(.*?)^[ \t]*```", re.M | re.S)


def blocks(text: str) -> list[str]:
    """The shell blocks of a page (also those indented under a list item), as the shell reads them."""
    out = []
    for indent, lang, body in FENCE.findall(text):
        body = "\n".join(line[len(indent):] if line.startswith(indent) else line for line in body.splitlines())
        if lang == "console":
            body = "\n".join(line[2:] for line in body.splitlines() if line.startswith("$ "))
        out.append(body)
    return out


def logical_lines(block: str) -> list[str]:
    """Join continued lines, drop heredoc bodies (the command that reads one is still checked)."""
    out, cur, heredoc = [], "", None
    for line in block.splitlines():
        if heredoc is not None:
            if line.strip() == heredoc:
                heredoc = None
            continue
        m = re.search(r"<<-?\s*'?\"?(\w+)'?\"?", line)
        if m:
            heredoc = m.group(1)
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        cur += line
        if open_quote(cur):  # a quoted argument that goes on over the next line
            cur += "\n"
            continue
        if cur.strip():
            out.append(cur.strip())
        cur = ""
    if cur.strip():
        out.append(cur.strip())
    return out


def open_quote(line: str) -> bool:
    try:
        shlex.split(re.sub(r"\$\(([^()]*)\)", "SUBST", line), comments=True)
    except ValueError:
        return True
    return False


def simple_commands(line: str) -> list[list[str]]:
    """Words of each simple command of a shell line; command substitutions become commands of their own."""
    subs = re.findall(r"\$\(([^()]*)\)", line)
    line = re.sub(r"\$\(([^()]*)\)", "SUBST", line)
    lex = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
    lex.whitespace_split = True
    lex.commenters = "#"
    words, cmds = [], []
    try:
        tokens = list(lex)
    except ValueError as e:
        raise AssertionError(f"not a shell line ({e}): {line}") from None
    skip_next = False
    for tok in tokens:
        if skip_next:
            skip_next = False
            continue
        if set(tok) <= set(";&|"):
            cmds.append(words)
            words = []
        elif set(tok) <= set("<>"):
            skip_next = True  # the redirection's target
        else:
            words.append(tok)
    cmds.append(words)
    for s in subs:
        cmds.extend(simple_commands(s))
    return [c for c in cmds if c]


@functools.cache
def make_targets() -> set[str]:
    return set(re.findall(r"^([a-zA-Z][\w./-]*)\s*:(?!=)", (REPO / "Makefile").read_text(), flags=re.M))


@functools.cache
def make_variables() -> set[str]:
    return set(re.findall(r"^([A-Z][A-Z0-9_]*)\s*[?:+]?=", (REPO / "Makefile").read_text(), flags=re.M))


@functools.cache
def env_read_by_project() -> str:
    parts = [(REPO / "Makefile").read_text(), (REPO / "ray_cluster.yaml").read_text()]
    for folder in ("pipeline", "jobs", "scripts", "infra", "benchmarks"):
        parts += [p.read_text(errors="replace") for p in (REPO / folder).rglob("*")
                  if p.is_file() and p.suffix in (".py", ".sh", ".yaml", ".yml", ".ini", "", ".txt")
                  and "__pycache__" not in p.parts]
    return "\n".join(parts)


@functools.cache
def help_text(*argv: str) -> str:
    r = subprocess.run([*argv, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{' '.join(argv)} --help failed: {r.stderr[-2000:]}"
    return r.stdout


def options(help_out: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", help_out))


def check_env(name: str, problems: list[str], where: str) -> None:
    if name in EXTERNAL_ENV or name.startswith("GPU_") and name in make_variables():
        return
    if not re.search(rf"\b{re.escape(name)}\b", env_read_by_project()):
        problems.append(f"{where}: ${name} is read by nothing in the project")


def check_path(word: str, problems: list[str], where: str) -> None:
    word = word.removeprefix("file://")
    head = word.split("/", 1)[0]
    if head in REPO_TOP | {"jobs", "pipeline", "infra", "benchmarks", "scripts", "tests", "docs"} and "/" in word \
            and not any(c in word for c in "<>*{}$") and head not in (".run", "gpu-kit", "gpu-results"):
        if not (REPO / word.split(":", 1)[0]).exists():
            problems.append(f"{where}: {word} does not exist in the repository")
    elif word in ("ray_cluster.yaml", "Makefile", "pyproject.toml") and not (REPO / word).exists():
        problems.append(f"{where}: {word} does not exist")


def check_flags(words: list[str], known: set[str], problems: list[str], where: str, what: str) -> None:
    for w in words:
        if w == "--":
            break
        if re.match(r"--?[A-Za-z]", w):
            flag = w.split("=", 1)[0]
            if flag not in known:
                problems.append(f"{where}: {what} has no option {flag}")


def check_python(words: list[str], problems: list[str], where: str, runs: list[list[str]]) -> None:
    if words[:1] == ["-"]:
        return  # a script on stdin (heredoc): its lines are Python, not shell
    if words[:1] == ["-c"]:
        return
    if words[:1] == ["-m"] and len(words) > 1:
        mod = words[1]
        if mod in ("venv", "pip", "pytest"):
            return
        spec = REPO / (mod.replace(".", "/") + ".py")
        if not spec.exists():
            problems.append(f"{where}: python -m {mod}: no such module in the repository")
            return
        known = options(help_text(PY, "-m", mod)) | {"-h", "--help"}
        check_flags(words[2:], known, problems, where, f"python -m {mod}")
        if mod == "pipeline.model.summary" or "--help" in words:
            runs.append([PY, *words])
        return
    script = words[0]
    if not (REPO / script).is_file():
        problems.append(f"{where}: {script} does not exist")
        return
    known = options(help_text(PY, script)) | {"-h", "--help"}
    check_flags(words[1:], known, problems, where, script)
    if "--help" in words:
        runs.append([PY, *words])


def check_ray(words: list[str], problems: list[str], where: str, runs: list[list[str]]) -> None:
    sub = []
    for w in words:
        if w.startswith("-"):
            break
        sub.append(w)
        if w in ("submit", "logs", "stop", "status", "list", "up", "down", "dashboard", "start", "get-auth-token",
                 "exec", "attach", "memory"):
            break
    known = options(help_text(str(BIN / "ray"), *sub)) | {"-h", "--help"}
    rest = words[len(sub):]
    if "--" in rest:
        i = rest.index("--")
        check_flags(rest[:i], known, problems, where, f"ray {' '.join(sub)}")
        check_command(rest[i + 1:], problems, where, runs)
    else:
        check_flags(rest, known, problems, where, f"ray {' '.join(sub)}")


def check_command(words: list[str], problems: list[str], where: str, runs: list[list[str]]) -> None:
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):  # VAR=value cmd
        check_env(words[0].split("=", 1)[0], problems, where)
        words = words[1:]
    if not words:
        return
    prog, args = words[0], words[1:]
    for w in args:
        check_path(w, problems, where)
        for v in re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", w):
            check_env(v, problems, where)
    for v in re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", prog):
        check_env(v, problems, where)
    prog = prog.removeprefix(".venv/bin/")
    if prog == "make":
        for w in args:
            if "=" in w:
                var = w.split("=", 1)[0]
                if var not in make_variables():
                    problems.append(f"{where}: make has no variable {var}")
            elif not w.startswith("-") and w not in make_targets():
                problems.append(f"{where}: make has no target {w}")
    elif prog in ("python", "python3") and args and (args[0].endswith(".py") or args[0] in ("-m", "-", "-c")):
        check_python(args, problems, where, runs)
    elif prog == "ray":
        check_ray(args, problems, where, runs)
    elif prog == "mlflow":
        sub = [w for w in args[:2] if not w.startswith("-")]
        known = options(help_text(str(BIN / "mlflow"), *sub)) | {"-h", "--help"}
        check_flags(args[len(sub):], known, problems, where, f"mlflow {' '.join(sub)}")
    elif prog == "export":
        for w in args:
            check_env(w.split("=", 1)[0], problems, where)
    elif prog in ("bash", "sh") and args:
        if args[0] != "-c":
            check_path(args[0], problems, where)
            if not (REPO / args[0]).is_file():
                problems.append(f"{where}: {args[0]} does not exist")
    elif "/" in prog and not prog.startswith(("/", "~", "$")):
        if not (REPO / prog).is_file():
            problems.append(f"{where}: {prog} does not exist")
    elif prog not in EXTERNAL:
        problems.append(f"{where}: {prog} is not a program this project ships or a known tool")


def check_markdown(text: str, name: str) -> tuple[list[str], list[list[str]]]:
    problems, runs = [], []
    for block in blocks(text):
        for line in logical_lines(block):
            for words in simple_commands(line):
                check_command(words, problems, f"{name}: {line[:80]}", runs)
    return problems, runs


def test_the_docs_have_commands_to_check():
    n = sum(len(blocks(p.read_text())) for p in doc_files())
    assert n >= 30, n


def test_every_command_in_the_docs_is_valid():
    problems, runs = [], []
    for page in doc_files():
        p, r = check_markdown(page.read_text(), str(page.relative_to(REPO)))
        problems += p
        runs += r
    assert problems == []
    assert runs, "nothing in the docs ran"
    for argv in {tuple(r) for r in runs}:
        res = subprocess.run(list(argv), cwd=REPO, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, (argv, res.stderr[-2000:])


@pytest.mark.parametrize("md, expected", [
    ("```bash\npython jobs/train_ensemble.py --recpie demo\n```", "has no option --recpie"),
    ("```bash\nray job submit --address http://127.0.0.1:8265 -- python jobs/shard_dataset.py --sourse x\n```",
     "has no option --sourse"),
    ("```bash\nray job sumbit --adress http://127.0.0.1:8265 -- python jobs/shard_dataset.py\n```",
     "ray job sumbit --help failed"),
    ("```bash\nRAY_AUTH_MODE=token ray job submit --entrypoint-cpus 1 -- python jobs/x.py\n```",
     "ray job submit has no option --entrypoint-cpus"),
    ("```bash\nmake dmeo\n```", "make has no target dmeo"),
    ("```bash\nmake demo DEMO_MINTUES=30\n```", "make has no variable DEMO_MINTUES"),
    ("```bash\nkubectl apply -f infra/kuberay/rayjob-shrad.yaml\n```", "does not exist in the repository"),
    ("```bash\nINCEPTION_SHARD_CACHE_G=10 python jobs/shard_dataset.py --help\n```", "read by nothing"),
    ("```bash\nterraform apply\n```", "not a program this project ships"),
    ("```console\n$ python -m pipeline.model.sumary\noutput line\n```", "no such module"),
])
def test_the_command_check_catches_a_misspelling(md, expected):
    try:
        problems, _ = check_markdown(md, "example.md")
    except AssertionError as e:  # a CLI's --help that fails is itself the finding
        problems = [str(e)]
    assert any(expected in p for p in problems), problems


def test_the_command_check_passes_a_correct_example():
    md = ("```bash\nRAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --entrypoint-num-cpus 1 \\\n"
          "    --working-dir . -- python jobs/train_ensemble.py --recipe demo --set data.shards=$PWD/x  # a comment\n"
          "make demo DEMO_MINUTES=30 && make down\n```")
    assert check_markdown(md, "example.md")[0] == []


def cluster_problems(text: str, name: str) -> list[str]:
    """What a command against a cloud cluster needs beyond valid flags: the cluster runs Ray's token
    authentication (a `ray job` command without RAY_AUTH_MODE=token gets 401, and `ray up` needs the token
    made first); its nodes reach MLflow only through --mlflow-uri or their own environment; a pod must be
    ready before `kubectl cp`; `docker compose` needs the compose file's path from the project's folder."""
    problems, seen = [], []
    for block in blocks(text):
        for line in logical_lines(block):
            for words in simple_commands(line):
                seen.append(words)
    # a page that reaches a cloud cluster's job server: through `ray up`/`ray dashboard` or a port-forward
    on_cluster = any(w[:2] in (["ray", "up"], ["ray", "dashboard"], ["kubectl", "port-forward"]) for w in seen)
    for i, words in enumerate(seen):
        cmd = " ".join(words)
        prog = [w for w in words if not re.match(r"^[A-Z_][A-Z0-9_]*=", w)]
        if on_cluster and prog[:2] == ["ray", "job"] and "RAY_AUTH_MODE=token" not in words:
            problems.append(f"{name}: {cmd[:80]}: no RAY_AUTH_MODE=token")
        if on_cluster and prog[:3] == ["ray", "job", "submit"] and "jobs/" in cmd and "--mlflow-uri" not in cmd:
            problems.append(f"{name}: {cmd[:80]}: the job's nodes are not given --mlflow-uri")
        if prog[:2] == ["ray", "up"] and not any(w[:2] == ["ray", "get-auth-token"] for w in seen[:i]):
            problems.append(f"{name}: ray up before the token is made (ray get-auth-token --generate)")
        if prog[:2] == ["kubectl", "cp"] and not any(w[:2] == ["kubectl", "wait"] and "--for=condition=Ready" in w
                                                     for w in seen[:i]):
            problems.append(f"{name}: kubectl cp before the pod is ready (kubectl wait --for=condition=Ready)")
        if prog[:2] == ["docker", "compose"] and "-f" not in prog:
            problems.append(f"{name}: docker compose without -f infra/mlflow/docker-compose.yml")
    return problems


def test_cluster_commands_carry_what_the_cluster_needs():
    problems = [p for page in doc_files() for p in cluster_problems(page.read_text(), page.name)]
    assert problems == []


def test_the_cluster_check_catches_a_submit_without_the_token():
    md = ("```bash\nray up ray_cluster.yaml\nray job submit --address http://127.0.0.1:8265 -- python jobs/shard_dataset.py\n"
          "kubectl cp x copy:/data/x\ndocker compose up -d\n```")
    found = cluster_problems(md, "example.md")
    for what in ("no RAY_AUTH_MODE=token", "--mlflow-uri", "ray up before the token", "kubectl cp before",
                 "docker compose without -f"):
        assert any(what in p for p in found), (what, found)


def test_paths_given_to_jobs_in_the_docs_are_absolute():
    """A job submitted with --working-dir runs in a temporary copy of it: a relative data.shards,
    ensemble.storage_path or --out would be refused (or lost with the copy)."""
    found = []
    for page in doc_files():
        for block in blocks(page.read_text()):
            found += [(page.name, p) for p in re.findall(r"(?:ensemble\.storage_path|data\.shards)=(\S+)", block)]
            found += [(page.name, p) for p in re.findall(r"ray job submit .*?--out (\S+)", block.replace("\\\n", " "))]
    assert len(found) >= 10
    assert [f for f in found if not f[1].startswith(("/", "$PWD/", "s3://", "~/"))] == []
